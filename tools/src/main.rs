//! `ferry`: live-migrate running KVM VMs between hosts.

mod bench;
mod console;
mod demo;
mod listen;
mod migrate;
mod net;
mod opts;
mod plot;
mod topo;
mod vmrun;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// ferry live-migrates running KVM virtual machines between hosts, in a time bounded by the
/// VM's memory size (memory-bound pre-copy).
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a source VM and a destination on loopback, migrate the running VM, print a report.
    Demo(demo::DemoArgs),
    /// Run a VM with a guest workload and a control socket that `ferry migrate` talks to.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Destination: accept one incoming VM, resume it and keep running it.
    Listen(listen::ListenArgs),
    /// Source: migrate the VM behind a control socket to a destination.
    Migrate(migrate::MigrateArgs),
    /// Measurements: `ferry bench transport` (lane goodput, like iperf3).
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Shared keys for the handshake.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Work with migration reports: `ferry report plot` draws a timeline.
    Report {
        #[command(subcommand)]
        cmd: ReportCmd,
    },
    /// Show this host's NUMA nodes, CPUs and NICs, and how ferry would place its workers.
    Topo(topo::TopoArgs),
}

#[derive(Subcommand)]
enum VmCmd {
    /// Run a VM (serial output on stdout) until it is migrated away or interrupted.
    Run(vmrun::RunArgs),
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Draw the timeline of one migration (throughput per lane, dirty and never-sent memory,
    /// vCPU throttle) as an SVG.
    Plot(plot::PlotArgs),
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Write a new random 32-byte key to FILE (mode 0600; never overwrites).
    New {
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Vm { cmd: VmCmd::Run(a) } => vmrun::run(a),
        Cmd::Listen(a) => listen::run(a),
        Cmd::Migrate(a) => migrate::run(a),
        Cmd::Bench { cmd } => bench::run(cmd),
        Cmd::Topo(a) => topo::run(a),
        Cmd::Report {
            cmd: ReportCmd::Plot(a),
        } => plot::run(a),
        Cmd::Key {
            cmd: KeyCmd::New { file, json },
        } => ferry_transport::Key::generate(&file)
            .map(|_| {
                if json {
                    println!("{}", serde_json::json!({ "key": file }));
                } else {
                    eprintln!("ferry: wrote a new key to {}", file.display());
                }
                0
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(1);
        }
    }
}
