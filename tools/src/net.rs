//! Connecting the engine to transport lanes: the source side of `migrate`/`demo` and the
//! destination side of `listen`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use ferry_engine::dest::{self, DestConfig, DestReport};
use ferry_engine::host::Launched;
use ferry_engine::report::{ProgressEvent, Report};
use ferry_engine::source;
use ferry_engine::vm::{Serial, Vm};
use ferry_transport::{Key, Listener, SessionConfig, SessionReceiver, SessionSender};

use crate::opts::MigrateOpts;

/// How often a waiting listener checks for a stop signal.
const POLL: Duration = Duration::from_millis(250);
/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn session_config() -> SessionConfig {
    let mut c = SessionConfig::default();
    c.lane.connect_timeout = CONNECT_TIMEOUT;
    c.lane.handshake_timeout = CONNECT_TIMEOUT;
    c
}

/// Resolves `ADDR:PORT` (names allowed) to the first address.
pub fn resolve(to: &str) -> anyhow::Result<SocketAddr> {
    to.to_socket_addrs()
        .with_context(|| format!("resolving destination {to:?}"))?
        .next()
        .with_context(|| format!("destination {to:?} resolves to no address"))
}

/// Migrates the launched VM to `to`. On error the VM is running here again.
pub fn migrate_to(
    launched: &Launched,
    to: &str,
    key: &Path,
    opts: &MigrateOpts,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> anyhow::Result<Report> {
    let cfg = opts.source_config()?;
    let key = Key::load(key)?;
    let addr = resolve(to)?;
    let tx = SessionSender::connect(addr, &[None], &key, session_config())
        .with_context(|| format!("connecting to the destination {addr}"))?;
    let report = source::migrate(&launched.vm, &launched.tracker, &tx, &cfg, progress)
        .context("migration failed and was rolled back")?;
    Ok(report)
}

/// Waits for a migration on `listener` (until `stop` is set) and returns the VM running here.
pub fn receive(
    listener: &Listener,
    key: &Key,
    serial: std::sync::Arc<Serial>,
    stop: &AtomicBool,
) -> anyhow::Result<(Vm, DestReport)> {
    let rx = loop {
        match SessionReceiver::accept(listener, key, session_config(), Some(POLL)) {
            Ok(rx) => break rx,
            Err(ferry_transport::Error::AcceptTimeout { .. }) if !stop.load(Ordering::Relaxed) => {
                continue
            }
            Err(_) if stop.load(Ordering::Relaxed) => anyhow::bail!("interrupted while waiting"),
            Err(e) => return Err(e).context("accepting a migration"),
        }
    };
    let out = dest::receive(&std::sync::Arc::new(rx), serial, &DestConfig::default())
        .context("receiving the VM failed; nothing was resumed here")?;
    Ok(out)
}
