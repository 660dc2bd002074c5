//! `ferry demo`: a source VM in this process, a destination `ferry listen` in a second
//! process, a live migration between them over loopback TCP, and a report.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_engine::host;
use ferry_engine::report::Phase;
use ferry_engine::vm::Serial;
use serde_json::{json, Value};

use crate::console::Console;
use crate::net;
use crate::opts::{parse_secs, GuestOpts, MigrateOpts};

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    guest: GuestOpts,
    #[command(flatten)]
    opts: MigrateOpts,
    /// How long the VM runs on the source before the migration starts (seconds).
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    warmup: Duration,
    /// How long the VM runs on the destination afterwards, before it is checked (seconds).
    #[arg(long, default_value = "3", value_parser = parse_secs)]
    after: Duration,
    /// Print the report (with the destination's checks) as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// The destination allocates each page of guest memory when it arrives instead of all of
    /// it up front (`ferry listen --no-prealloc`).
    #[arg(long)]
    no_prealloc: bool,
}

/// Kills the destination process if the demo ends early.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // It may have exited already.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(a: DemoArgs) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let key = dir.path().join("demo.key");
    ferry_transport::Key::generate(&key)?;
    let exe = std::env::current_exe().context("finding the ferry executable")?;
    let mut child = Command::new(exe)
        .args([
            "listen",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--serial",
            "/dev/stderr",
        ])
        .args(["--prefix", "[destination] ", "--exit-after"])
        .arg(a.after.as_secs_f64().to_string())
        .args(a.no_prealloc.then_some("--no-prealloc"))
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the destination process")?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = ChildGuard(Some(child));
    let mut lines = BufReader::new(stdout).lines();
    let first: Value = serde_json::from_str(
        &lines
            .next()
            .context("the destination exited before listening")??,
    )?;
    let addr = first["listening"]
        .as_str()
        .with_context(|| format!("unexpected first line from the destination: {first}"))?
        .to_string();

    let console = Console::default();
    let serial = Serial::new(Some(console.serial_sink()), "[source]      ");
    let spec = a.guest.spec();
    let mut launched = host::launch(&spec, serial).context("starting the source VM")?;
    console.line(&format!(
        "ferry demo: source VM running ({} MiB, {} vCPU(s), workload {}, fill {}); destination pid {} on {addr}",
        a.guest.mem >> 20,
        a.guest.vcpus,
        a.guest.workload,
        a.guest.fill,
        guard.0.as_ref().map_or(0, |c| c.id()),
    ));
    std::thread::sleep(a.warmup);
    console.line(&format!(
        "ferry demo: migrating with policy {} (verify {})",
        a.opts.policy, a.opts.verify
    ));
    console.start_bar();
    let mut progress = |ev: &ferry_engine::report::ProgressEvent| {
        if ev.phase == Phase::Setup {
            if let Some(b) = ev.bound_ms {
                console.line(&format!(
                    "ferry demo: bound {:.1} s: the migration promises to finish within it",
                    b / 1e3
                ));
            }
        }
        console.progress(ev);
    };
    let result = net::migrate_to(&launched, Some(&addr), &key, &a.opts, &mut progress);
    console.finish_bar();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            console.line("ferry demo: the VM keeps running on the source");
            launched.vm.shutdown();
            return Err(e);
        }
    };
    launched.vm.shutdown();
    console.line("ferry demo: VM resumed on the destination; its serial output continues there");

    let dest: Value = lines
        .next()
        .context("the destination exited without a result")??
        .parse::<Value>()
        .context("parsing the destination's result")?;
    let status = guard.0.take().map(|mut c| c.wait()).transpose()?;
    let ok = dest["self_check_ok"].as_bool() == Some(true)
        && dest["progressed"].as_bool() == Some(true)
        && status.is_some_and(|s| s.success());
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["destination"] = dest;
        v["guest_ok_after_migration"] = json!(ok);
        println!("{v}");
    } else {
        println!("{}", report.summary());
        println!(
            "destination: guest ran {:.1} s after resume, self-check {}, progress {}",
            dest["ran_ms"].as_f64().unwrap_or(0.0) / 1e3,
            if dest["self_check_ok"].as_bool() == Some(true) {
                "passed"
            } else {
                "FAILED"
            },
            if dest["progressed"].as_bool() == Some(true) {
                "continued"
            } else {
                "STALLED"
            },
        );
    }
    Ok(if ok && report.verified { 0 } else { 1 })
}
