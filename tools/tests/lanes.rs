//! Migrations over two lanes of the testbed (two network namespaces joined by two shaped
//! veth pairs, addresses from 198.18.0.0/15): both lanes carry the VM, and when one link is
//! cut mid-migration its batches are resent on the other and the migration completes with
//! identical memory. Needs root, /dev/kvm, iproute2; fails loudly without them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{require_kvm, wait_for_socket, Proc, FERRY};

/// A running testbed: `testbed.sh exec` holding the namespaces until its stdin closes.
struct Testbed {
    env: HashMap<String, String>,
    stdin: Option<ChildStdin>,
    proc: Proc,
}

impl Testbed {
    fn start(lanes: u32, rate: &str) -> Self {
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        assert_eq!(
            uid,
            Some(0),
            "the lane tests need root (namespaces); they do not skip"
        );
        require_kvm();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/testbed.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .args(["exec", "--lanes", &lanes.to_string(), "--rate", rate, "--"])
            .args([
                "bash",
                "-c",
                "env | grep ^FERRY_; echo READY; cat >/dev/null",
            ])
            .env("FERRY", FERRY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting benches/testbed.sh");
        let stdin = child.stdin.take().unwrap();
        let mut env = HashMap::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if line == "READY" {
                break;
            }
            if let Some((k, v)) = line.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        assert!(
            env.contains_key("FERRY_SRC_NS"),
            "testbed did not start: {env:?}"
        );
        Self {
            env,
            stdin: Some(stdin),
            proc: Proc(child),
        }
    }

    fn ns(&self, side: &str) -> &str {
        &self.env[&format!("FERRY_{side}_NS")]
    }

    fn in_ns(&self, side: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(side), FERRY]);
        c
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Closing stdin ends the held command; the script then removes the namespaces
        // (killing the script instead would skip its cleanup).
        drop(self.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.proc.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if std::thread::panicking() {
            return;
        }
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        for side in ["SRC", "DST"] {
            let ns = self.ns(side);
            assert!(!list.contains(ns), "namespace {ns} was left behind: {list}");
        }
    }
}

struct Outcome {
    report: Value,
    dest: Value,
    /// The `--progress-json` events, in order.
    progress: Vec<Value>,
}

/// Runs `vm run` in the source namespace, `listen` on both lane addresses in the
/// destination namespace, and `ferry migrate` over both lanes; `cut` runs once the live
/// phase has started.
fn migrate_over_two_lanes(tb: &Testbed, cut: Option<&dyn Fn()>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let sock = dir.path().join("vm.sock");
    assert!(Command::new(FERRY)
        .arg("key")
        .arg("new")
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let port = 7900;
    let mut dest = Proc(
        tb.in_ns("DST")
            .args([
                "listen",
                "--json",
                "--exit-after",
                "1",
                "--serial",
                "/dev/null",
            ])
            .args(["--listen", &format!("198.18.0.2:{port}")])
            .args(["--listen", &format!("198.18.1.2:{port}")])
            .arg("--key")
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut dest_out = BufReader::new(dest.0.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&dest_out.next().unwrap().unwrap()).unwrap();
    assert!(first["listening"].is_string(), "{first}");

    let _vm = Proc(
        tb.in_ns("SRC")
            .args([
                "vm",
                "run",
                "--mem",
                "256M",
                "--workload",
                "idle",
                "--control",
            ])
            .arg(&sock)
            .args(["--serial", "/dev/null"])
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock);
    let mut mig = Proc(
        Command::new(FERRY)
            .args([
                "migrate",
                "--progress-json",
                "--lane-timeout",
                "2",
                "--control",
            ])
            .arg(&sock)
            .arg("--key")
            .arg(&key)
            .args(["--lane", &format!("198.18.0.1=198.18.0.2:{port}")])
            .args(["--lane", &format!("198.18.1.1=198.18.1.2:{port}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // `--progress-json` prints progress lines; the report comes as the last line (JSON
    // requested through --progress-json's sibling: read until a line with "verified").
    let mut report = Value::Null;
    let mut cut_done = false;
    let mut last = String::new();
    let mut progress = Vec::new();
    for line in BufReader::new(mig.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        last.clone_from(&line);
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v.get("progress").is_some() {
            progress.push(v["progress"].clone());
        }
        if v["progress"]["phase"] == "live" && !cut_done {
            if let Some(cut) = cut {
                cut();
            }
            cut_done = true;
        }
        if v.get("verified").is_some() {
            report = v;
        }
    }
    let status = mig.0.wait().unwrap();
    assert!(status.success(), "migrate failed; last line {last}");
    let dest_line = dest_out.next().expect("destination result").unwrap();
    let dest_v: Value = serde_json::from_str(&dest_line).unwrap();
    let _ = std::io::stdout().flush();
    Outcome {
        report,
        dest: dest_v,
        progress,
    }
}

#[test]
fn two_lanes_carry_the_vm_and_survive_a_cut_link() {
    let tb = Testbed::start(2, "100mbit");

    // Both lanes up: both carry a fair share.
    let o = migrate_over_two_lanes(&tb, None);
    assert_eq!(o.report["verified"], true, "{}", o.report);
    assert_eq!(o.dest["self_check_ok"], true, "{}", o.dest);
    assert_eq!(o.dest["progressed"], true, "{}", o.dest);
    // The stream opens in setup, before the destination is ready and the bound known; the
    // bound comes before the live phase.
    assert_eq!(o.progress[0]["phase"], "setup", "{:?}", o.progress);
    assert!(o.progress[0]["bound_ms"].is_null(), "{:?}", o.progress);
    assert!(o.progress[0]["eta_ms"].is_null(), "{:?}", o.progress);
    let live = o.progress.iter().position(|e| e["phase"] == "live");
    let bound = o.progress.iter().position(|e| e["bound_ms"].is_f64());
    assert!(bound.is_some() && bound <= live, "{:?}", o.progress);
    // The setup's last event forecasts the whole migration before the first page, as the
    // report's forecast at 0 does: the same time left, from the moment that forecast was
    // made (the live phase's clock has run while the log was read once before it).
    let ready = &o.progress[live.unwrap() - 1];
    assert_eq!(ready["phase"], "setup", "{:?}", o.progress);
    let eta = ready["eta_ms"].as_f64().unwrap_or(f64::NAN);
    let at_start = o.report["forecasts"][0].clone();
    assert_eq!(at_start["at_fraction"], 0.0, "{}", o.report);
    let left = at_start["total_ms"].as_f64().unwrap() - at_start["elapsed_ms"].as_f64().unwrap();
    assert!(
        eta > 0.0 && (eta - left).abs() < 1.0,
        "{ready} against {at_start}"
    );
    // Every forecast comes with its range (the guest and the lanes slower or faster than
    // measured), the forecast in it; the report keeps it with the forecast at each mark.
    for ev in o.progress.iter().filter(|e| e["phase"] == "live") {
        let range = ev["eta_range_ms"].as_array().expect("a range");
        let (least, most) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
        let eta = ev["eta_ms"].as_f64().unwrap();
        assert!(0.0 < least && least <= eta && eta <= most, "{ev}");
    }
    let range = at_start["total_range_ms"].as_array().expect("a range");
    assert!(
        range[0].as_f64() <= at_start["total_ms"].as_f64(),
        "{at_start}"
    );
    assert!(
        range[1].as_f64() >= at_start["total_ms"].as_f64(),
        "{at_start}"
    );
    // At the end of the live phase each mark gets its hindsight: the rates from it on, and
    // the forecast from those. From the mark at 0, the lanes' rate covers what they carried
    // in the live phase (up to a throttle, if the policy throttled): every wire byte but the
    // stop-and-copy's.
    for mark in o.report["forecasts"].as_array().unwrap() {
        let h = &mark["hindsight"];
        let f = |k: &str| h[k].as_f64().unwrap_or_else(|| panic!("{k} in {mark}"));
        assert!(
            f("guest_speed_after") > 0.0 && f("guest_speed") > 0.0,
            "{mark}"
        );
        assert!(f("bandwidth") > 0.0 && f("bandwidth_after") > 0.0, "{mark}");
        assert!(f("bytes_per_page_after") > 0.0, "{mark}");
        assert!(
            f("total_ms") > mark["elapsed_ms"].as_f64().unwrap(),
            "{mark}"
        );
    }
    let f = |k: &str| o.report[k].as_f64().unwrap();
    let h = &at_start["hindsight"];
    let live_bytes = h["bandwidth_after"].as_f64().unwrap()
        * (f("live_ms") - at_start["elapsed_ms"].as_f64().unwrap())
        / 1e3;
    let last_pages = f("final_pages") * (4096.0 + 64.0);
    let throttled = f("max_throttle") > 0.0;
    assert!(
        live_bytes <= 1.02 * f("wire_bytes")
            && (throttled || live_bytes >= 0.9 * (f("wire_bytes") - last_pages)),
        "{live_bytes} live bytes of {} ({h})",
        f("wire_bytes")
    );
    // It closes with the stop-and-copy, sent before the pause, and done: nothing is sent
    // during the downtime. The report's timeline still has the switchover phase.
    let phases: Vec<&str> = o
        .progress
        .iter()
        .filter_map(|e| e["phase"].as_str())
        .collect();
    let last_live = phases.iter().rposition(|&p| p == "live").unwrap();
    assert_eq!(
        phases[last_live + 1..],
        ["stop-and-copy", "done"],
        "{phases:?}"
    );
    let last = &o.progress[o.progress.len() - 2..];
    assert!(last[0]["eta_ms"].as_f64() > Some(0.0), "{last:?}");
    assert_eq!(last[1]["eta_ms"].as_f64(), Some(0.0), "{last:?}");
    let timeline = o.report["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["phase"] == "switchover"),
        "{}",
        o.report
    );
    let lanes = o.report["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), 2, "{}", o.report);
    let bytes: Vec<f64> = lanes.iter().map(|l| l["bytes"].as_f64().unwrap()).collect();
    let total: f64 = bytes.iter().sum();
    for (i, b) in bytes.iter().enumerate() {
        assert!(
            *b > 0.25 * total,
            "lane {i} carried {b} of {total}: {}",
            o.report
        );
        assert!(lanes[i]["failed"].is_null(), "{}", o.report);
    }

    // Lane 1's link goes down in the live phase: its batches go again on lane 0.
    let src = tb.ns("SRC").to_string();
    let cut = move || {
        let s = Command::new("ip")
            .args(["-n", &src, "link", "set", "ln1", "down"])
            .status()
            .unwrap();
        assert!(s.success(), "could not take ln1 down");
    };
    let o = migrate_over_two_lanes(&tb, Some(&cut));
    assert_eq!(o.report["verified"], true, "{}", o.report);
    assert_eq!(o.dest["self_check_ok"], true, "{}", o.dest);
    assert_eq!(o.dest["progressed"], true, "{}", o.dest);
    assert_eq!(o.dest["audit"]["bad_pages"], 0, "{}", o.dest);
    let lanes = o.report["lanes"].as_array().unwrap();
    assert!(
        lanes[1]["failed"].is_string(),
        "lane 1 should have failed: {}",
        o.report
    );
    assert!(lanes[0]["failed"].is_null(), "{}", o.report);
}
