//! `ferry listen`: the destination. Accepts one VM, resumes it, and runs it (serial output on
//! stdout) until interrupted or, with `--exit-after`, for a while; it then checks the
//! guest's self-check and memory and reports.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_engine::guest;
use ferry_engine::vm::Serial;
use ferry_transport::{Key, Listener};
use serde_json::json;

use crate::net;
use crate::opts::parse_secs;
use crate::vmrun::{serial_sink, stop_flag};

#[derive(Args)]
pub struct ListenArgs {
    /// Address and port to accept lanes on (port 0: any free port). Repeat for several NICs.
    #[arg(long, default_value = "0.0.0.0:7878")]
    listen: Vec<String>,
    /// Shared key file (see `ferry key new`).
    #[arg(long)]
    key: PathBuf,
    /// Write the guest's serial output to FILE instead of stdout (stderr with --json).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Prefix for every serial line.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Run the resumed VM this long (seconds), then check it and exit (0 if its self-check
    /// passed and its memory audit is clean).
    #[arg(long, value_parser = parse_secs)]
    exit_after: Option<Duration>,
    /// Machine-readable output: `{"listening": ADDR}` once bound, then one JSON result.
    #[arg(long)]
    json: bool,
    /// Do not allocate all of guest memory before the first page arrives: allocate each page
    /// when it does (zero pages never), as a sparse guest on a tight host may want. By
    /// default the memory is allocated up front, so that a host short of it fails before
    /// the source sends anything, and the first write to a page costs nothing while pages
    /// arrive.
    #[arg(long)]
    no_prealloc: bool,
}

pub fn run(a: ListenArgs) -> anyhow::Result<i32> {
    let stop = stop_flag()?;
    let key = Key::load(&a.key)?;
    let listeners = a
        .listen
        .iter()
        .map(|l| Listener::bind(net::resolve(l)?).with_context(|| format!("listening on {l}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    if a.json {
        println!("{}", json!({ "listening": addrs[0], "all": addrs }));
    }
    eprintln!("ferry: listening on {}", addrs.join(", "));
    let serial = Serial::new(
        Some(serial_sink(a.serial.as_deref(), a.json)?),
        a.prefix.clone(),
    );
    let (mut vm, dest_report) = match net::receive(&listeners, &key, serial, !a.no_prealloc, &stop)
    {
        Ok(v) => v,
        Err(e) => {
            if a.json {
                println!("{}", json!({ "error": format!("{e:#}") }));
            }
            return Err(e);
        }
    };
    let resumed_at = Instant::now();
    let at_resume = guest::status(vm.memory())?;
    eprintln!("ferry: VM resumed here");
    while !stop.load(Ordering::Relaxed) && a.exit_after.is_none_or(|d| resumed_at.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.pause()?;
    let at_exit = guest::status(vm.memory())?;
    let audit = guest::audit(vm.memory())?;
    let allocated = vm.memory().allocated_bytes()?;
    vm.shutdown();
    let fails: u64 = at_exit.iter().map(|s| s.fails).sum();
    let progressed = at_exit
        .iter()
        .zip(&at_resume)
        .all(|(e, r)| e.writes + e.checks > r.writes + r.checks);
    let ok = fails == 0 && audit.bad_pages == 0;
    if a.json {
        println!(
            "{}",
            json!({
                "resumed": true,
                "self_check_ok": ok,
                "progressed": progressed,
                "ran_ms": resumed_at.elapsed().as_secs_f64() * 1e3,
                "receive": dest_report,
                "guest_at_resume": at_resume,
                "guest_at_exit": at_exit,
                "audit": audit,
                "guest_allocated_bytes": allocated,
            })
        );
    } else {
        eprintln!(
            "ferry: guest self-check {} ({} fails, {} bad pages in audit); guest progress {}",
            if ok { "passed" } else { "FAILED" },
            fails,
            audit.bad_pages,
            if progressed { "continued" } else { "STALLED" }
        );
    }
    Ok(if ok { 0 } else { 1 })
}
