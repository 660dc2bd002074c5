//! `ferry vm run`: a VM with a guest workload, and a control socket (JSON lines) through
//! which `ferry migrate` starts a migration and follows its progress.
//!
//! Control protocol, one JSON object per line. Requests: `{"migrate": {"to": ADDR, "key":
//! PATH, "opts": {...}}}` or `{"status": null}`. Replies to `migrate`: `{"progress": EVENT}`
//! lines, then `{"report": REPORT}` (the VM now runs on the destination and this process
//! exits 0) or `{"error": MESSAGE}` (the VM keeps running here).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_engine::host::{self, Launched};
use ferry_engine::vm::Serial;
use serde::{Deserialize, Serialize};

use crate::net;
use crate::opts::{GuestOpts, MigrateOpts};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    guest: GuestOpts,
    /// Control socket path (a Unix socket `ferry migrate --control` connects to).
    #[arg(long)]
    control: PathBuf,
    /// Write the guest's serial output to FILE instead of stdout (stderr with --json).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Prefix for every serial line.
    #[arg(long, default_value = "")]
    prefix: String,
    /// On exit, print the migration report (or error) as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    Migrate {
        to: Option<String>,
        key: PathBuf,
        opts: Box<MigrateOpts>,
    },
    Status(Option<()>),
}

/// Removes the control socket file when the process is done with it.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Already gone is fine.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens the serial sink: a file, or stdout (stderr when stdout carries JSON).
pub fn serial_sink(path: Option<&Path>, json: bool) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening serial output {}", p.display()))?,
        ),
        None if json => Box::new(std::io::stderr()),
        None => Box::new(std::io::stdout()),
    })
}

/// Sets a flag on the first SIGINT or SIGTERM (the program then stops cleanly); a second
/// one ends the process at once.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing signal handler")?;
    }
    Ok(stop)
}

pub fn run(a: RunArgs) -> anyhow::Result<i32> {
    let stop = stop_flag()?;
    if a.control.exists() {
        if UnixStream::connect(&a.control).is_ok() {
            anyhow::bail!(
                "control socket {} is in use by another ferry",
                a.control.display()
            );
        }
        std::fs::remove_file(&a.control)
            .with_context(|| format!("removing stale {}", a.control.display()))?;
    }
    let listener = UnixListener::bind(&a.control)
        .with_context(|| format!("binding control socket {}", a.control.display()))?;
    let _socket = SocketFile(a.control.clone());
    listener.set_nonblocking(true)?;
    let serial = Serial::new(
        Some(serial_sink(a.serial.as_deref(), a.json)?),
        a.prefix.clone(),
    );
    let mut launched = host::launch(&a.guest.spec(), serial).context("starting the VM")?;
    eprintln!(
        "ferry: VM running ({} MiB, {} vCPU(s), workload {}); control socket {}",
        a.guest.mem >> 20,
        a.guest.vcpus,
        a.guest.workload,
        a.control.display()
    );
    let mut last = serde_json::Value::Null;
    while !stop.load(Ordering::Relaxed) {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e).context("accepting on the control socket"),
        };
        conn.set_nonblocking(false)?;
        match serve(&mut launched, conn) {
            Ok(Some(report)) => {
                last = report;
                eprintln!("ferry: VM migrated away; exiting");
                launched.vm.shutdown();
                if a.json {
                    println!("{last}");
                }
                return Ok(0);
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("ferry: control connection: {e:#}");
                last = serde_json::json!({ "error": format!("{e:#}") });
            }
        }
    }
    launched.vm.shutdown();
    if a.json {
        println!("{last}");
    }
    Ok(0)
}

/// Serves one control connection; returns the report if the VM migrated away.
fn serve(launched: &mut Launched, conn: UnixStream) -> anyhow::Result<Option<serde_json::Value>> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let req: Request = serde_json::from_str(&line).context("malformed control request")?;
    let mut out = &conn;
    match req {
        Request::Status(_) => {
            let guest = ferry_engine::guest::status(launched.vm.memory())?;
            writeln!(
                out,
                "{}",
                serde_json::json!({ "status": { "running": launched.vm.is_running(), "guest": guest } })
            )?;
            Ok(None)
        }
        Request::Migrate { to, key, opts } => {
            let mut progress = |ev: &ferry_engine::report::ProgressEvent| {
                // The client may have gone away; the migration goes on regardless.
                let _ = writeln!(out, "{}", serde_json::json!({ "progress": ev }));
            };
            match net::migrate_to(launched, to.as_deref(), &key, &opts, &mut progress) {
                Ok(report) => {
                    let v = serde_json::to_value(&report)?;
                    writeln!(out, "{}", serde_json::json!({ "report": v }))?;
                    Ok(Some(v))
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    eprintln!("ferry: migration failed, the VM keeps running here: {msg}");
                    writeln!(out, "{}", serde_json::json!({ "error": msg }))?;
                    Ok(None)
                }
            }
        }
    }
}
