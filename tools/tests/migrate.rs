//! Whole migrations through the `ferry` binary, with real KVM, real processes and real TCP on
//! loopback. Needs /dev/kvm and root; fails loudly without them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{require_kvm, wait_for_socket, Proc, FERRY};

fn demo(args: &[&str]) -> (Value, Output) {
    let out = Command::new(FERRY)
        .args([
            "demo", "--json", "--mem", "128M", "--warmup", "0.5", "--after", "1",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON report from ferry demo {args:?}: status {:?}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (v, out)
}

fn assert_migrated(v: &Value, out: &Output, what: &str) {
    let ctx = || {
        format!(
            "{what}: {v:#}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success(), "ferry demo failed: {}", ctx());
    assert_eq!(v["verified"], true, "digests not equal: {}", ctx());
    assert_eq!(v["verify"], "full", "{}", ctx());
    let d = &v["destination"];
    assert_eq!(
        d["self_check_ok"],
        true,
        "guest self-check failed on the destination: {}",
        ctx()
    );
    assert_eq!(
        d["progressed"],
        true,
        "guest stalled on the destination: {}",
        ctx()
    );
    assert_eq!(d["audit"]["bad_pages"], 0, "{}", ctx());
    let mem = v["mem_bytes"].as_u64().unwrap();
    assert_eq!(mem, 128 << 20);
    // Every page went at least once (zero pages included) and the report adds up.
    let pages_sent = v["pages_sent"].as_u64().unwrap();
    assert!(pages_sent >= mem / 4096, "{}", ctx());
    let by_class: u64 = ["zero", "duplicate", "compressed", "raw", "lz4"]
        .iter()
        .map(|c| v["pages"][c]["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(by_class, pages_sent, "{}", ctx());
    for k in [
        "total_ms",
        "live_ms",
        "downtime_ms",
        "eviction_ms",
        "wire_bytes",
        "epochs",
    ] {
        assert!(v[k].as_f64().is_some(), "report lacks {k}: {}", ctx());
    }
    let total = v["total_ms"].as_f64().unwrap();
    let live = v["live_ms"].as_f64().unwrap();
    let down = v["downtime_ms"].as_f64().unwrap();
    let ack = v["switchover"]["ack_ms"].as_f64().unwrap();
    assert!(ack >= 0.0, "{}", ctx());
    assert!((live + down + ack - total).abs() < 1.0, "{}", ctx());
    // The switchover's steps account for the downtime, and the source's hashing happened
    // while the last pages travelled.
    let step = |k: &str| {
        let ms = v["switchover"][k].as_f64().unwrap_or(-1.0);
        assert!(ms >= 0.0, "switchover.{k}: {}", ctx());
        ms
    };
    let steps: f64 = [
        "pause_ms",
        "harvest_ms",
        "final_pages_ms",
        "state_ms",
        "commit_ms",
    ]
    .map(step)
    .iter()
    .sum();
    assert!(steps <= down + 0.5 && steps >= 0.95 * down, "{}", ctx());
    assert!(step("hash_ms") <= step("final_pages_ms") + 0.5, "{}", ctx());
    // With `--verify full` the source hashed its pages while the VM ran: at the pause, only
    // those of the final pass are stale (each is in a dirty group, or was never sent).
    if v["verify"] == "full" {
        // Every page starts stale, so each was hashed at least once in all.
        let at_pause = v["switchover"]["hash_pages"].as_u64().unwrap();
        assert_eq!(Some(at_pause), v["final_pages"].as_u64(), "{}", ctx());
        let live = v["switchover"]["live_hash_pages"].as_u64().unwrap();
        let pages = v["mem_bytes"].as_u64().unwrap() / 4096;
        assert!(live + at_pause >= pages, "{}", ctx());
    }
}

/// Every workload under both policies, through `ferry demo`.
#[test]
fn every_workload_under_both_policies() {
    require_kvm();
    for workload in ["idle", "dirty-all", "seq", "random", "hotcold"] {
        let (v, out) = demo(&[
            "--workload",
            workload,
            "--policy",
            "membound",
            "--epoch",
            "0.3",
        ]);
        assert_migrated(&v, &out, &format!("membound {workload}"));
        assert_eq!(v["policy"], "membound");
        // Memory-bound: at most 3 sends per page in all (2N live + N final, by default).
        let pages = v["mem_bytes"].as_u64().unwrap() / 4096;
        assert!(v["pages_sent"].as_u64().unwrap() <= 3 * pages, "{v:#}");
        assert_eq!(
            v["within_bound"], true,
            "membound exceeded its bound: {v:#}"
        );

        let (v, out) = demo(&[
            "--workload",
            workload,
            "--policy",
            "precopy",
            "--max-epochs",
            "4",
        ]);
        assert_migrated(&v, &out, &format!("precopy {workload}"));
        assert_eq!(v["policy"], "precopy");
        assert_eq!(v["deferred_pages"], 0, "precopy {workload}: {v:#}");
    }
}

/// Membound holds back the pages a sweeping guest writes before their first send, to send
/// them once, late; mplm sends them as it comes to them, and again in the stop-and-copy.
/// Verified identical either way. The link is capped so that the live phase lasts long
/// enough for the dirty log to be read (every 100 ms).
#[test]
fn membound_holds_back_pages_written_before_their_first_send() {
    require_kvm();
    for policy in ["membound", "mplm"] {
        let (v, out) = demo(&[
            "--workload",
            "seq",
            "--wss",
            "16M",
            "--policy",
            policy,
            "--max-bandwidth",
            "200M",
        ]);
        assert_migrated(&v, &out, policy);
        let held = v["deferred_pages"].as_u64().unwrap();
        if policy == "membound" {
            assert!(held > 0, "membound held nothing back: {v:#}");
        } else {
            assert_eq!(held, 0, "mplm held pages back: {v:#}");
        }
    }
}

/// The other policies, over-commit included, on a hot/cold guest: verified identical, the
/// guest goes on, the bounded ones within their bound, and the report has its timeline,
/// forecasts and controls.
#[test]
fn every_policy_and_overcommit() {
    require_kvm();
    let runs: [(&str, &[&str]); 5] = [
        ("mplm", &["--epoch", "0.3"]),
        ("timebound", &["--epoch", "0.3"]),
        ("autoconverge", &["--max-epochs", "6"]),
        ("membound", &["--epoch", "0.3", "--target-downtime", "1"]),
        (
            "timebound",
            &[
                "--overcommit",
                "1",
                "--overcommit-at",
                "0.2",
                "--vcpus",
                "2",
            ],
        ),
    ];
    for (policy, extra) in runs {
        let mut args = vec!["--workload", "hotcold", "--policy", policy];
        args.extend_from_slice(extra);
        let (v, out) = demo(&args);
        let what = format!("{policy} {extra:?}");
        assert_migrated(&v, &out, &what);
        assert_eq!(v["policy"], policy, "{what}");
        if policy != "autoconverge" {
            assert_eq!(v["within_bound"], true, "{what}: {v:#}");
        }
        let timeline = v["timeline"].as_array().expect("a timeline");
        assert!(timeline.len() >= 3, "{what}: {v:#}");
        assert_eq!(timeline.last().unwrap()["phase"], "done", "{what}");
        assert!(
            v["downtime_forecast_ms"].as_f64().is_some(),
            "{what}: {v:#}"
        );
        if extra.contains(&"--overcommit") {
            assert_eq!(v["min_vcpu_cores"], 1, "{what}: {v:#}");
            assert!(
                timeline.iter().any(|s| s["vcpu_cores"] == 1),
                "{what}: no over-committed sample"
            );
        }
    }
}

/// Each codec forced: pages travel as that class (random pages raw), in the stop-and-copy
/// too, memory identical.
#[test]
fn every_codec() {
    require_kvm();
    for (codec, class) in [("lz4", "lz4"), ("zstd", "compressed"), ("off", "raw")] {
        let (v, out) = demo(&["--workload", "random", "--compress", codec]);
        let what = format!("--compress {codec}");
        assert_migrated(&v, &out, &what);
        assert_eq!(
            v["codec"],
            if codec == "off" { "raw" } else { codec },
            "{what}"
        );
        // A forced codec is the stop-and-copy's too.
        assert_eq!(v["paused_codec"], v["codec"], "{what}");
        let pages = |c: &str| v["pages"][c]["pages"].as_u64().unwrap();
        assert!(pages(class) > 1000, "{what}: {v:#}");
        for other in ["lz4", "compressed"].into_iter().filter(|&c| c != class) {
            assert_eq!(pages(other), 0, "{what}: {other}");
        }
    }
}

/// Two vCPUs, zero fill, sampled verification, and a destination that allocates pages as
/// they arrive: the zero pages it is never sent stay unallocated there.
#[test]
fn two_vcpus_zero_fill_sampled_verify() {
    require_kvm();
    let (v, out) = demo(&[
        "--no-prealloc",
        "--vcpus",
        "2",
        "--fill",
        "zero",
        "--workload",
        "random",
        "--wss",
        "4M",
        "--region",
        "32M",
        "--verify",
        "sample",
    ]);
    assert!(out.status.success(), "{v:#}");
    assert_eq!(v["verified"], true);
    assert_eq!(v["verify"], "sample");
    assert_eq!(v["vcpus"], 2);
    assert!(
        v["pages"]["zero"]["pages"].as_u64().unwrap() > 20_000,
        "{v:#}"
    );
    assert_eq!(v["destination"]["self_check_ok"], true);
    assert!(v["probe"]["dest_prealloc_ms"].is_null(), "{v:#}");
    let allocated = v["destination"]["guest_allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated < 48 << 20,
        "{allocated} bytes of the 128 MiB zero-filled guest allocated: {v:#}"
    );
}

/// `--verify reread`: the destination hashes its memory at switchover instead of using the
/// terms it kept as it wrote pages; the digests are equal either way.
#[test]
fn reread_verification() {
    require_kvm();
    let (v, out) = demo(&["--workload", "hotcold", "--verify", "reread"]);
    assert!(out.status.success(), "{v:#}");
    assert_eq!(v["verified"], true, "{v:#}");
    assert_eq!(v["verify"], "reread");
    assert_eq!(v["destination"]["self_check_ok"], true, "{v:#}");
    assert_eq!(v["destination"]["progressed"], true, "{v:#}");
}

/// The three-process flow: `vm run` owns the VM, `listen` is the destination, `migrate`
/// asks the VM's process to migrate over its control socket.
#[test]
fn vm_run_listen_migrate() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let sock = dir.path().join("vm.sock");
    let serial = dir.path().join("serial.log");
    assert!(Command::new(FERRY)
        .arg("key")
        .arg("new")
        .arg(&key)
        .status()
        .unwrap()
        .success());

    let mut dest = Proc(
        Command::new(FERRY)
            .args([
                "listen",
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--exit-after",
                "1",
                "--key",
            ])
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut dest_out = BufReader::new(dest.0.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&dest_out.next().unwrap().unwrap()).unwrap();
    let addr = first["listening"].as_str().unwrap().to_string();

    let _vm = Proc(
        Command::new(FERRY)
            .args([
                "vm",
                "run",
                "--mem",
                "128M",
                "--workload",
                "seq",
                "--control",
            ])
            .arg(&sock)
            .arg("--serial")
            .arg(&serial)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock);
    // The guest runs and reports on the source before the migration.
    std::thread::sleep(Duration::from_millis(1500));
    let status = control(&sock, r#"{"status":null}"#);
    assert_eq!(status["status"]["running"], true, "{status}");

    let out = Command::new(FERRY)
        .args(["migrate", "--json", "--to", &addr, "--control"])
        .arg(&sock)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true, "{report:#}");
    let result: Value = serde_json::from_str(&dest_out.next().unwrap().unwrap()).unwrap();
    assert_eq!(result["self_check_ok"], true, "{result:#}");
    assert_eq!(result["progressed"], true, "{result:#}");
    // By default the destination allocated all of guest memory before the first page.
    let prealloc = report["probe"]["dest_prealloc_ms"].as_f64();
    assert!(prealloc.is_some_and(|ms| ms > 0.0), "{report:#}");
    assert_eq!(result["receive"]["prealloc_ms"].as_f64(), prealloc);
    // The setup, outside the total, includes that allocation.
    assert!(report["setup_ms"].as_f64() > prealloc, "{report:#}");
    assert_eq!(result["guest_allocated_bytes"], 128u64 << 20, "{result:#}");
    assert!(dest.0.wait().unwrap().success());
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(
        log.contains("vcpu 0: writes"),
        "no guest output on the source: {log}"
    );
}

fn control(sock: &std::path::Path, req: &str) -> Value {
    let mut c = UnixStream::connect(sock).unwrap();
    writeln!(c, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}
