//! Summarises criterion's results: walks `target/criterion` (or the directory given), and
//! prints one JSON object per benchmark (`name`, `mean_ns` with its 95% bounds,
//! `median_ns`, `slope_ns` when criterion fitted one, and `bytes_per_s` or
//! `elements_per_s`, computed from the mean, when the benchmark declared a throughput),
//! then a markdown table (rates in decimal units: 1 GB/s = 10^9 bytes per second). The
//! first line is a JSON object with the command that produced the results.
//!
//! ```text
//! cargo bench -p ferry-benches
//! cargo run -p ferry-benches --bin criterion_summary [-- DIR] > results.txt
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

const COMMAND: &str = "cargo bench -p ferry-benches";

struct Row {
    name: String,
    mean_ns: f64,
    lower_ns: f64,
    upper_ns: f64,
    median_ns: f64,
    /// The slope of the linear regression (what criterion prints as `time` when it has one).
    slope_ns: Option<f64>,
    /// ("bytes" | "elements", per iteration).
    throughput: Option<(&'static str, f64)>,
}

/// Every `benchmark.json` under a `new` directory (criterion's latest run of a benchmark).
fn find(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "new") {
                let b = path.join("benchmark.json");
                if b.is_file() && path.join("estimates.json").is_file() {
                    out.push(b);
                }
            } else {
                find(&path, out);
            }
        }
    }
}

fn read(path: &Path) -> Option<Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

fn row(benchmark: &Path) -> Option<Row> {
    let b = read(benchmark)?;
    let e = read(&benchmark.with_file_name("estimates.json"))?;
    let name = b["full_id"].as_str()?.to_string();
    let mean = &e["mean"];
    let throughput = b["throughput"].as_object().and_then(|t| {
        let (kind, v) = t.iter().next()?;
        let unit = match kind.as_str() {
            "Bytes" | "BytesDecimal" => "bytes",
            "Elements" => "elements",
            _ => return None,
        };
        Some((unit, v.as_f64()?))
    });
    Some(Row {
        name,
        mean_ns: mean["point_estimate"].as_f64()?,
        lower_ns: mean["confidence_interval"]["lower_bound"].as_f64()?,
        upper_ns: mean["confidence_interval"]["upper_bound"].as_f64()?,
        median_ns: e["median"]["point_estimate"].as_f64()?,
        slope_ns: e["slope"]["point_estimate"].as_f64(),
        throughput,
    })
}

/// A duration in ns, in the unit that suits it.
fn time(ns: f64) -> String {
    match ns {
        n if n < 1e3 => format!("{n:.2} ns"),
        n if n < 1e6 => format!("{:.2} µs", n / 1e3),
        n if n < 1e9 => format!("{:.2} ms", n / 1e6),
        n => format!("{:.2} s", n / 1e9),
    }
}

/// A rate per second in decimal units (GB/s = 10^9 bytes per second).
fn rate(per_s: f64, unit: &str) -> String {
    let (div, prefix) = match per_s {
        r if r >= 1e9 => (1e9, "G"),
        r if r >= 1e6 => (1e6, "M"),
        r if r >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    match unit {
        "bytes" => format!("{:.2} {prefix}B/s", per_s / div),
        _ => format!("{:.2} {prefix}elem/s", per_s / div),
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
        })
        .unwrap_or_else(|| {
            // This binary lives in <workspace>/benches; criterion writes to <workspace>/target.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
        });
    let dir = fs::canonicalize(&dir).unwrap_or(dir);
    let mut files = Vec::new();
    find(&dir, &mut files);
    let mut rows: Vec<Row> = files.iter().filter_map(|f| row(f)).collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    if rows.is_empty() {
        eprintln!(
            "no criterion results under {} (run `{COMMAND}` first)",
            dir.display()
        );
        std::process::exit(1);
    }

    println!(
        "{}",
        json!({ "command": COMMAND, "results": dir.display().to_string(), "benchmarks": rows.len() })
    );
    for r in &rows {
        let mut o = json!({
            "name": r.name,
            "mean_ns": r.mean_ns,
            "mean_ns_lower": r.lower_ns,
            "mean_ns_upper": r.upper_ns,
            "median_ns": r.median_ns,
        });
        if let Some(slope) = r.slope_ns {
            o["slope_ns"] = json!(slope);
        }
        if let Some((unit, per_iter)) = r.throughput {
            o[format!("{unit}_per_iter")] = json!(per_iter);
            o[format!("{unit}_per_s")] = json!(per_iter * 1e9 / r.mean_ns);
        }
        println!("{o}");
    }

    println!();
    println!("| benchmark | mean | 95% CI | throughput |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        let tp = r
            .throughput
            .map_or_else(String::new, |(unit, n)| rate(n * 1e9 / r.mean_ns, unit));
        println!(
            "| {} | {} | {} – {} | {} |",
            r.name,
            time(r.mean_ns),
            time(r.lower_ns),
            time(r.upper_ns),
            tp
        );
    }
}
