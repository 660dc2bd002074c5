//! The testbed script (`benches/testbed.sh`): namespaces joined by shaped veth pairs,
//! iperf3 and `ferry bench transport` over them, and cleanup on every path. Needs root,
//! iproute2 and iperf3 (scripts/setup.sh); fails loudly without them.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/testbed.sh")
}

/// The tests run one at a time: one of them plants namespaces that look orphaned, which
/// the others' check for orphans would otherwise see.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root() {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid());
    assert_eq!(
        uid.ok(),
        Some(0),
        "the testbed tests create network namespaces: they need root; they do not skip"
    );
}

fn testbed(args: &[&str]) -> Command {
    require_root();
    let mut c = Command::new("bash");
    c.arg(script())
        .args(args)
        .env("FERRY", FERRY)
        .stdin(Stdio::null());
    c
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Asserts that the namespaces of the testbed run `pid` are gone, and that no testbed
/// namespace outlived its script (other tests' running scripts may still hold theirs).
fn assert_no_namespaces_left(pid: u32) {
    let all = namespaces();
    for side in ["src", "dst"] {
        let ns = format!("ferry-{side}-{pid}");
        assert!(!all.contains(&ns), "{ns} was left behind: {all:?}");
    }
    let orphans: Vec<_> = all
        .iter()
        .filter(|ns| {
            let owner = ns
                .strip_prefix("ferry-src-")
                .or_else(|| ns.strip_prefix("ferry-dst-"));
            owner.is_some_and(|p| !PathBuf::from(format!("/proc/{p}")).exists())
        })
        .collect();
    assert!(
        orphans.is_empty(),
        "testbed namespaces whose script has exited: {orphans:?}"
    );
}

fn run(mut c: Command) -> (Output, u32) {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting benches/testbed.sh");
    let pid = child.id();
    (
        child.wait_with_output().expect("waiting for testbed.sh"),
        pid,
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bench_transport_over_two_shaped_lanes_reports_both_and_the_ratio() {
    let _serial = serial();
    let args = [
        "bench-transport",
        "--lanes",
        "2",
        "--rate",
        "200mbit",
        "--duration",
        "2",
    ];
    let (out, pid) = run(testbed(&args));
    let stdout = text(&out.stdout);
    let ctx = format!("stdout: {stdout}\nstderr: {}", text(&out.stderr));
    assert!(out.status.success(), "testbed.sh failed: {ctx}");
    let v: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON result: {ctx}"));
    assert!(
        v["command"]
            .as_str()
            .unwrap_or("")
            .contains("bench-transport"),
        "{ctx}"
    );
    assert_eq!(v["lanes"], 2, "{ctx}");
    for tool in ["iperf3", "ferry"] {
        let lanes = v[tool]["lanes"].as_array().expect("per-lane results");
        assert_eq!(lanes.len(), 2, "{tool}: {ctx}");
        for l in lanes {
            let bytes = l
                .get("payload_bytes")
                .or_else(|| l.get("bytes"))
                .and_then(Value::as_u64);
            assert!(bytes > Some(0), "{tool} lane carried nothing: {l}\n{ctx}");
        }
        let agg = v[tool]["aggregate_mbit_s"].as_f64().unwrap_or(0.0);
        assert!(agg > 0.0, "{tool} aggregate: {ctx}");
        // Shaped to 200 Mbit/s per lane and direction: nothing can beat two lanes of it.
        assert!(
            agg < 2.0 * 200.0 * 1.05,
            "{tool} above the shaped rate: {ctx}"
        );
    }
    let ratio = v["ratio"].as_f64().expect("ratio present");
    assert!(ratio > 0.0, "{ctx}");
    assert_no_namespaces_left(pid);
}

#[test]
fn exec_describes_the_testbed_and_cleans_up_after_a_failing_command() {
    let _serial = serial();
    let cmd = r#"echo "$FERRY_SRC_NS|$FERRY_DST_NS|$FERRY_LANES|$FERRY_DST_ADDRS|$FERRY_RATE"
        ip -n "$FERRY_DST_NS" -4 -o addr show dev ln2
        tc -n "$FERRY_SRC_NS" qdisc show dev ln0
        exit 7"#;
    let (out, pid) = run(testbed(&[
        "exec", "--lanes", "3", "--rate", "100mbit", "--burst", "100000", "--", "sh", "-c", cmd,
    ]));
    let stdout = text(&out.stdout);
    let ctx = format!("stdout: {stdout}\nstderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "the command's status: {ctx}");
    let first = stdout.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!(
            "ferry-src-{pid}|ferry-dst-{pid}|198.18.0.1=198.18.0.2 198.18.1.1=198.18.1.2 \
             198.18.2.1=198.18.2.2|198.18.0.2 198.18.1.2 198.18.2.2|100mbit"
        ),
        "{ctx}"
    );
    assert!(stdout.contains("inet 198.18.2.2/24"), "{ctx}");
    assert!(
        stdout.contains("tbf") && stdout.contains("100Mbit") && stdout.contains("burst 100000b"),
        "the shaper at the rate and bucket asked for: {ctx}"
    );
    assert_no_namespaces_left(pid);
}

#[test]
fn sigterm_kills_what_the_testbed_started_and_removes_the_namespaces() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let cmd = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let mut child = testbed(&["exec", "--lanes", "1", "--", "sh", "-c", &cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting benches/testbed.sh");
    let pid = child.id();
    let t0 = Instant::now();
    let sleeper = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the command never started"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(namespaces().contains(&format!("ferry-src-{pid}")));
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "testbed.sh ignored SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "exit status after SIGTERM");
    let gone = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .map_or(true, |s| s.contains("State:\tZ"))
    };
    assert!(gone(sleeper), "the command it started is still running");
    assert_no_namespaces_left(pid);
}

/// A run killed outright (SIGKILL, the machine restarting) leaves its namespaces behind; the
/// next run removes them.
#[test]
fn a_later_run_removes_the_namespaces_of_a_killed_one() {
    let _serial = serial();
    require_root();
    let mut done = Command::new("true").spawn().expect("starting true");
    done.wait().unwrap();
    let dead = done.id();
    let planted: Vec<String> = ["src", "dst"]
        .iter()
        .map(|side| format!("ferry-{side}-{dead}"))
        .collect();
    for ns in &planted {
        let add = Command::new("ip").args(["netns", "add", ns]).status();
        assert!(add.is_ok_and(|s| s.success()), "ip netns add {ns}");
    }
    let (out, pid) = run(testbed(&["exec", "--lanes", "1", "--", "true"]));
    let stderr = text(&out.stderr);
    let left: Vec<_> = namespaces()
        .into_iter()
        .filter(|ns| planted.contains(ns))
        .collect();
    for ns in &left {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    assert!(out.status.success(), "testbed.sh failed: {stderr}");
    assert!(left.is_empty(), "{left:?} survived the next run: {stderr}");
    assert!(
        stderr.contains(&format!("removed namespace ferry-src-{dead}")),
        "{stderr}"
    );
    assert_no_namespaces_left(pid);
}
