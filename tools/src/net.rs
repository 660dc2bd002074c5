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
use crate::topo::{parse_lane, LaneSpec, Local};

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

/// A lane to open: the local address to bind (if any) and the remote address.
pub type Route = (Option<SocketAddr>, SocketAddr);

/// Resolves lane specs: a LOCAL interface name becomes its first IPv4 address (else its
/// first address), the remote is resolved like `--to`.
pub fn resolve_lanes(specs: &[LaneSpec]) -> anyhow::Result<Vec<Route>> {
    let topo = std::sync::OnceLock::new();
    specs
        .iter()
        .map(|spec| {
            let local = match &spec.local {
                None => None,
                Some(Local::Addr(a)) => Some(SocketAddr::new(*a, 0)),
                Some(Local::Interface(name)) => {
                    let t = topo.get_or_init(ferry_engine::topo::Topology::discover);
                    let t = t.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let nic = t
                        .nic(name)
                        .with_context(|| format!("no network interface named {name:?}"))?;
                    let a = nic
                        .addrs
                        .iter()
                        .find(|a| a.is_ipv4())
                        .or(nic.addrs.first())
                        .with_context(|| format!("network interface {name} has no address"))?;
                    Some(SocketAddr::new(*a, 0))
                }
            };
            Ok((local, resolve(&spec.remote)?))
        })
        .collect()
}

/// The lanes to open: each `--lane LOCAL=REMOTE:PORT`, each `--nic IF` to `to`, or
/// `--lanes N` lanes to `to`.
pub fn routes(to: Option<&str>, opts: &MigrateOpts) -> anyhow::Result<Vec<Route>> {
    let mut specs = opts
        .lane
        .iter()
        .map(|s| parse_lane(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !opts.nic.is_empty() {
        let to = to.context("--nic needs the destination in --to ADDR:PORT")?;
        specs.extend(opts.nic.iter().map(|nic| LaneSpec {
            local: Some(Local::Interface(nic.clone())),
            remote: to.to_string(),
        }));
    }
    if !specs.is_empty() {
        return resolve_lanes(&specs);
    }
    let to = to.context("give the destination with --to ADDR:PORT or --lane LOCAL=REMOTE:PORT")?;
    let addr = resolve(to)?;
    Ok(vec![(None, addr); opts.lanes.max(1)])
}

/// The NUMA placement of workers and ranges for these lanes, or `None` if the topology
/// cannot be read (workers then run unpinned on one queue).
fn placement(vm: &Vm, routes: &[Route], opts: &MigrateOpts) -> Option<source::Placement> {
    use ferry_engine::topo::{self, MemRegion, PlanConfig, Topology};
    let t = Topology::discover()
        .map_err(|e| log::warn!("no topology ({e}); workers run unpinned"))
        .ok()?;
    let lanes: Vec<_> = routes
        .iter()
        .map(|(l, _)| {
            l.and_then(|a| t.node_of_addr(a.ip()))
                .or_else(|| t.only_node())
        })
        .collect();
    let regions = MemRegion::from_layout(&vm.memory().layout(), t.only_node());
    let cfg = PlanConfig {
        workers: opts.workers,
        range_bytes: opts.range,
    };
    let plan = topo::plan(&t, &regions, &lanes, &cfg)
        .map_err(|e| log::warn!("no placement plan ({e}); workers run unpinned"))
        .ok()?;
    Some(source::Placement::from_plan(&plan))
}

/// Migrates the launched VM to `to` (or over `opts.lane`). On error the VM is running here
/// again.
pub fn migrate_to(
    launched: &Launched,
    to: Option<&str>,
    key: &Path,
    opts: &MigrateOpts,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> anyhow::Result<Report> {
    let mut cfg = opts.source_config()?;
    let key = Key::load(key)?;
    let routes = routes(to, opts)?;
    cfg.placement = placement(&launched.vm, &routes, opts);
    if let Some(p) = &cfg.placement {
        log::info!(
            "placement: {} workers on cpus {:?}",
            p.worker_cpus.len(),
            p.worker_cpus
        );
    }
    let mut session = session_config();
    session.lane.user_timeout = Some(opts.lane_timeout);
    let tx = SessionSender::connect_routes(&routes, &key, session).with_context(|| {
        format!(
            "connecting to the destination {}",
            routes
                .iter()
                .map(|r| r.1.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let report = source::migrate(&launched.vm, &launched.tracker, &tx, &cfg, progress)
        .context("migration failed and was rolled back")?;
    Ok(report)
}

/// Accepts the lanes of one session on any of `listeners` (one per NIC), until `stop` is
/// set: the first lane says how many lanes the session has.
pub fn accept_session(
    listeners: &[Listener],
    key: &Key,
    stop: &AtomicBool,
) -> anyhow::Result<SessionReceiver> {
    let cfg = session_config();
    let mut lanes = Vec::new();
    let mut want = 1;
    let mut waited = Duration::ZERO;
    while lanes.len() < want {
        for l in listeners {
            match l.accept_timeout(key, POLL / listeners.len() as u32) {
                Ok(lane) => {
                    want = usize::from(lane.info().lanes).max(1);
                    lanes.push(lane);
                    waited = Duration::ZERO;
                }
                Err(ferry_transport::Error::AcceptTimeout { .. }) => {}
                Err(e) => return Err(e).context("accepting a lane"),
            }
        }
        if stop.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted while waiting for a migration");
        }
        if !lanes.is_empty() {
            waited += POLL;
            anyhow::ensure!(
                waited < CONNECT_TIMEOUT * 2,
                "only {} of {want} lanes connected",
                lanes.len()
            );
        }
    }
    SessionReceiver::new(lanes, cfg).context("starting the session")
}

/// Waits for a migration on `listeners` (until `stop` is set) and returns the VM running
/// here; with `prealloc`, its memory is allocated before the first page
/// ([`DestConfig::prealloc`]).
pub fn receive(
    listeners: &[Listener],
    key: &Key,
    serial: std::sync::Arc<Serial>,
    prealloc: bool,
    stop: &AtomicBool,
) -> anyhow::Result<(Vm, DestReport)> {
    let rx = accept_session(listeners, key, stop)?;
    let cfg = DestConfig {
        prealloc,
        ..DestConfig::default()
    };
    let out = dest::receive(&std::sync::Arc::new(rx), serial, &cfg)
        .context("receiving the VM failed; nothing was resumed here")?;
    Ok(out)
}
