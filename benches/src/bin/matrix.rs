//! The whole-migration matrix: every workload × policy through `ferry demo --json` (source
//! and destination processes on loopback TCP), one row each. Writes JSON lines and a CSV to
//! the output directory and a markdown table to stdout.
//!
//! ```text
//! cargo build --release -p ferry -p ferry-benches
//! target/release/matrix --mem 1G --out docs/results
//! ```
//! Options: `--mem SIZE` (default 1G), `--workloads a,b,..`, `--policies a,b`, `--out DIR`
//! (default `bench-results`), `--ferry PATH` (default: `ferry` next to this binary),
//! `--extra "ARGS"` (more `ferry demo` arguments, split on spaces).

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

struct Args {
    mem: String,
    workloads: Vec<String>,
    policies: Vec<String>,
    out: PathBuf,
    ferry: PathBuf,
    extra: Vec<String>,
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().expect("own path");
    let mut a = Args {
        mem: "1G".into(),
        workloads: ["idle", "dirty-all", "seq", "random", "hotcold"]
            .map(String::from)
            .to_vec(),
        policies: ["membound", "precopy"].map(String::from).to_vec(),
        out: "bench-results".into(),
        ferry: exe.with_file_name("ferry"),
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--mem" => a.mem = v(),
            "--workloads" => a.workloads = v().split(',').map(String::from).collect(),
            "--policies" => a.policies = v().split(',').map(String::from).collect(),
            "--out" => a.out = v().into(),
            "--ferry" => a.ferry = v().into(),
            "--extra" => a.extra = v().split_whitespace().map(String::from).collect(),
            _ => panic!("unknown option {k}"),
        }
    }
    a
}

/// Workload parameters used in the matrix: working sets that are a quarter of memory.
fn workload_args(w: &str, mem: &str) -> Vec<String> {
    let quarter = format!("{}M", parse_mib(mem) / 4);
    match w {
        "seq" | "random" | "hotcold" => vec!["--wss".into(), quarter],
        _ => vec![],
    }
}

fn parse_mib(s: &str) -> u64 {
    let (n, u) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().expect("size");
    match u {
        "G" | "GiB" => n * 1024,
        "M" | "MiB" | "" => n,
        _ => panic!("use M or G in --mem"),
    }
}

fn main() {
    let a = parse_args();
    std::fs::create_dir_all(&a.out).expect("creating the output directory");
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    let mut jsonl = std::fs::File::create(a.out.join("matrix.jsonl")).expect("matrix.jsonl");
    let mut csv = std::fs::File::create(a.out.join("matrix.csv")).expect("matrix.csv");
    writeln!(csv, "# {cmdline}").unwrap();
    writeln!(
        csv,
        "workload,policy,mem_bytes,verified,converged,total_ms,live_ms,downtime_ms,bound_ms,wire_bytes,wire_over_mem,throughput_mib_s,epochs,pages_sent,final_pages"
    )
    .unwrap();
    println!("<!-- {cmdline} -->");
    println!("| workload | policy | verified | converged | total ms | live ms | downtime ms | bound ms | wire MiB | wire/mem | MiB/s | epochs |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in &a.workloads {
        for p in &a.policies {
            let out = Command::new(&a.ferry)
                .args([
                    "demo",
                    "--json",
                    "--mem",
                    &a.mem,
                    "--workload",
                    w,
                    "--policy",
                    p,
                ])
                .args(["--warmup", "2", "--after", "1"])
                .args(workload_args(w, &a.mem))
                .args(&a.extra)
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", a.ferry.display()));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let v: Value = stdout
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| {
                    serde_json::json!({ "error": String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string() })
                });
            let mut row = v.clone();
            row["workload"] = w.as_str().into();
            writeln!(jsonl, "{row}").unwrap();
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let mem = f("mem_bytes");
            println!(
                "| {w} | {p} | {} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} | {} |",
                v["verified"],
                v["converged"],
                f("total_ms"),
                f("live_ms"),
                f("downtime_ms"),
                f("bound_ms"),
                f("wire_bytes") / 1048576.0,
                f("wire_bytes") / mem,
                f("throughput_bytes_per_s") / 1048576.0,
                v["epochs"]
            );
            writeln!(
                csv,
                "{w},{p},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                mem,
                v["verified"],
                v["converged"],
                f("total_ms"),
                f("live_ms"),
                f("downtime_ms"),
                f("bound_ms"),
                f("wire_bytes"),
                f("wire_bytes") / mem,
                f("throughput_bytes_per_s") / 1048576.0,
                v["epochs"],
                v["pages_sent"],
                v["final_pages"]
            )
            .unwrap();
        }
    }
}
