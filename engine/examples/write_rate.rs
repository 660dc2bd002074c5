//! How fast a freshly booted guest writes, and what write protection costs it: the guest
//! program runs under real KVM (`/dev/kvm`, as root) and its own counters are read every
//! 250 ms, first from boot, then after every page is write-protected again, then with half
//! of the pages write-protected again every 50 ms (what sends do to a guest during a
//! migration).
//!
//! ```text
//! cargo run --release -p ferry-engine --example write_rate -- dirty-all
//! cargo run --release -p ferry-engine --example write_rate -- seq 128
//! ```
//!
//! Arguments: the workload (`dirty-all`, `seq`, `random`, `hotcold`), then the working set
//! per vCPU in MiB (default: its whole share of the 512 MiB guest, 2 vCPUs).

use std::thread::sleep;
use std::time::{Duration, Instant};

use ferry_engine::dirty::DirtyTracker;
use ferry_engine::guest::{status, GuestParams, Workload};
use ferry_engine::host::{launch, GuestSpec, DEFAULT_REGION_BYTES};
use ferry_engine::vm::Serial;

const MEM: u64 = 512 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workload = match args.first().map(String::as_str) {
        Some("dirty-all") => Workload::DirtyAll,
        Some("seq") => Workload::Seq,
        Some("random") => Workload::Random,
        Some("hotcold") => Workload::HotCold,
        _ => {
            eprintln!("usage: write_rate dirty-all|seq|random|hotcold [WSS_MIB]");
            std::process::exit(2);
        }
    };
    let wss_mib: u64 = args.get(1).map_or(0, |s| s.parse().expect("WSS_MIB"));
    let spec = GuestSpec {
        mem_bytes: MEM,
        region_bytes: DEFAULT_REGION_BYTES,
        guest: GuestParams {
            workload,
            vcpus: 2,
            wss_bytes: wss_mib << 20,
            ..Default::default()
        },
    };
    let t0 = Instant::now();
    let l = launch(&spec, Serial::new(None, "")).expect("launching the guest (needs /dev/kvm)");
    let writes = || -> u64 {
        let st = status(l.vm.memory()).expect("reading the guest's counters");
        st.iter().map(|s| s.writes).sum()
    };
    // The guest's writes per second over `windows` of 250 ms, calling `each` every 50 ms.
    let rates = |label: &str, windows: usize, each: &dyn Fn(u64)| {
        println!("{label}");
        for _ in 0..windows {
            let (w0, t) = (writes(), Instant::now());
            for k in 0..5 {
                each(k);
                sleep(Duration::from_millis(50));
            }
            let w = writes();
            let rate = (w - w0) as f64 / t.elapsed().as_secs_f64();
            println!(
                "  {:5.2} s  {:6.0} writes/s  {:8} written",
                t0.elapsed().as_secs_f64(),
                rate,
                w
            );
        }
    };
    let span = l.vm.memory().page_span();
    let every: Vec<u64> = (0..span).collect();
    let half: Vec<u64> = (0..span).step_by(2).collect();
    let protect = |pages: &[u64]| l.tracker.clear(pages).expect("KVM_CLEAR_DIRTY_LOG");
    rates("from boot (no page write-protected)", 24, &|_| {});
    protect(&every);
    rates("every page write-protected again", 4, &|_| {});
    rates(
        "half of the pages write-protected again every 50 ms",
        4,
        &|_| protect(&half),
    );
}
