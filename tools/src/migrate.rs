//! `ferry migrate`: asks the VM behind a control socket to migrate to a destination, shows
//! its progress and prints the report.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_engine::report::{ProgressEvent, Report};

use crate::console::Console;
use crate::opts::MigrateOpts;
use crate::vmrun::Request;

#[derive(Args)]
pub struct MigrateArgs {
    /// Control socket of the `ferry vm run` that owns the VM.
    #[arg(long)]
    control: PathBuf,
    /// Destination address (where `ferry listen` listens); or give lanes with --lane.
    #[arg(long)]
    to: Option<String>,
    /// Shared key file (see `ferry key new`).
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    opts: MigrateOpts,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Print every progress event as a JSON line on stdout (for scheduler hooks), then the
    /// report as the last line.
    #[arg(long)]
    progress_json: bool,
}

pub fn run(a: MigrateArgs) -> anyhow::Result<i32> {
    let key =
        std::fs::canonicalize(&a.key).with_context(|| format!("key file {}", a.key.display()))?;
    let mut conn = UnixStream::connect(&a.control)
        .with_context(|| format!("connecting to control socket {}", a.control.display()))?;
    let req = Request::Migrate {
        to: a.to.clone(),
        key,
        opts: Box::new(a.opts.clone()),
    };
    writeln!(conn, "{}", serde_json::to_string(&req)?)?;
    let console = Console::default();
    if !a.progress_json {
        console.start_bar();
    }
    for line in BufReader::new(&conn).lines() {
        let line = line.context("reading from the control socket")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(ev) = v.get("progress") {
            if a.progress_json {
                println!("{line}");
            } else {
                let ev: ProgressEvent = serde_json::from_value(ev.clone())?;
                if let Some(b) = ev
                    .bound_ms
                    .filter(|_| ev.phase == ferry_engine::report::Phase::Setup)
                {
                    console.line(&format!(
                        "ferry: bound {:.1} s (the time this migration promises)",
                        b / 1e3
                    ));
                }
                console.progress(&ev);
            }
        } else if let Some(r) = v.get("report") {
            console.finish_bar();
            let report: Report = serde_json::from_value(r.clone())?;
            if a.json || a.progress_json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.summary());
            }
            return Ok(0);
        } else if let Some(e) = v.get("error") {
            console.finish_bar();
            if a.json {
                println!("{}", serde_json::json!({ "error": e }));
            }
            anyhow::bail!(
                "{} (the VM keeps running on the source)",
                e.as_str().unwrap_or("unknown error")
            );
        }
    }
    console.finish_bar();
    anyhow::bail!("the VM's process closed the control socket without a result")
}
