//! Policy tests, driven by the simulator with a virtual clock.

use std::time::Duration;

use proptest::prelude::*;

use super::sim::{simulate, DirtyModel, Sim, SimConfig, SimEnd, SimOutcome};
use super::*;

/// Records every decision with the progress it was made on.
struct Spy {
    inner: Box<dyn Policy>,
    log: Vec<(Progress, Decision)>,
}

impl Spy {
    fn new(inner: Box<dyn Policy>) -> Self {
        Self {
            inner,
            log: Vec::new(),
        }
    }
}

impl Policy for Spy {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn decide(&mut self, p: &Progress) -> Decision {
        let d = self.inner.decide(p);
        self.log.push((p.clone(), d.clone()));
        d
    }
    fn forecast(&self, p: &Progress) -> Forecast {
        self.inner.forecast(p)
    }
    fn limit_reached(&self) -> bool {
        self.inner.limit_reached()
    }
}

const N: u64 = 4096;

/// 4096 pages of 4 KiB over a link carrying 4096 pages/s: one full pass takes one second.
fn sim_cfg(dirty: DirtyModel) -> SimConfig {
    SimConfig {
        pages: N,
        bandwidth: (N * 4096) as f64,
        bytes_per_page: 4096.0,
        dirty,
        seed: 7,
        ..SimConfig::default()
    }
}

fn policy_cfg() -> PolicyConfig {
    PolicyConfig {
        epoch: Duration::from_millis(200),
        ..PolicyConfig::default()
    }
}

/// Bound with no allowance and no slack: page transfers only.
fn tight(cfg: &PolicyConfig) -> PolicyConfig {
    PolicyConfig {
        bound_fixed: Duration::ZERO,
        bound_per_gib: Duration::ZERO,
        bound_slack: 1.0,
        ..cfg.clone()
    }
}

fn dirty_all(times_link: f64) -> DirtyModel {
    DirtyModel::Sequential {
        rate: times_link * N as f64,
        working_set: N,
    }
}

fn run(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    sim: SimConfig,
) -> (SimOutcome, Vec<(Progress, Decision)>) {
    let mut spy = Spy::new(make_policy(kind, cfg));
    let out = simulate(sim, &mut spy);
    (out, spy.log)
}

fn assert_within_bound(kind: PolicyKind, cfg: &PolicyConfig, sim: &SimConfig, out: &SimOutcome) {
    let pages = bound_pages(kind, sim.pages, cfg).expect("a bound");
    assert!(
        out.pages_sent <= pages,
        "{} pages sent > bound {pages}",
        out.pages_sent
    );
    let b = bound(
        kind,
        sim.pages * 4096,
        sim.bandwidth,
        sim.bytes_per_page,
        cfg,
    )
    .expect("a bound");
    // Float sums of page times: allow a microsecond of rounding.
    assert!(
        out.total <= b + Duration::from_micros(1),
        "total {:?} > bound {b:?} ({out:?})",
        out.total
    );
}

fn progress(epoch: u32, never_sent: u64, dirty: u64) -> Progress {
    Progress {
        elapsed: Duration::from_secs(10),
        since_harvest: Duration::ZERO,
        epoch,
        total_pages: N,
        never_sent,
        dirty,
        pages_sent: N - never_sent,
        bytes_sent: (N - never_sent) * 4096,
        bandwidth: 1e6,
        bytes_per_page: 4096.0,
        dirtied_last_epoch: dirty,
    }
}

// ---- membound ----

#[test]
fn membound_switches_over_exactly_when_never_sent_empties() {
    let cfg = policy_cfg();
    let sim = sim_cfg(DirtyModel::Uniform {
        rate: 2000.0,
        working_set: N / 2,
    });
    let (out, log) = run(PolicyKind::Membound, &cfg, sim);
    assert_eq!(out.end, SimEnd::Completed);
    assert!(out.consistent && out.converged);
    let (last_p, last_d) = log.last().unwrap();
    assert_eq!(*last_d, Decision::Switchover);
    assert_eq!(last_p.never_sent, 0);
    for (p, d) in &log[..log.len() - 1] {
        assert!(p.never_sent > 0, "a decision after never_sent hit 0: {d:?}");
        assert_ne!(*d, Decision::Switchover);
    }
}

#[test]
fn membound_cycle_split_is_exact() {
    let mut m = Membound::new(PolicyConfig::default());
    let send = |never_sent, dirty| Decision::Send { never_sent, dirty };
    assert_eq!(m.decide(&progress(1, 1000, 1000)), send(50, 50));
    // Dirty short: never-sent fills the cycle.
    assert_eq!(m.decide(&progress(1, 1000, 10)), send(90, 10));
    assert_eq!(m.decide(&progress(1, 1000, 0)), send(100, 0));
    // Never-sent short: dirty fills the cycle.
    assert_eq!(m.decide(&progress(1, 10, 1000)), send(10, 90));
    assert_eq!(m.decide(&progress(1, 1, 0)), send(1, 0));
    // Resend budget spent: never-sent only.
    let mut p = progress(1, 1000, 1000);
    p.pages_sent += N;
    assert_eq!(m.decide(&p), send(100, 0));
    // Another split.
    let mut m = Membound::new(PolicyConfig {
        cycle_pages: 64,
        dirty_share: 0.25,
        ..PolicyConfig::default()
    });
    assert_eq!(m.decide(&progress(3, 1000, 1000)), send(48, 16));

    // In a whole simulated migration: every cycle with both groups plentiful is 50/50.
    let (out, log) = run(PolicyKind::Membound, &policy_cfg(), sim_cfg(dirty_all(0.5)));
    assert_eq!(out.end, SimEnd::Completed);
    let mut split_cycles = 0;
    for (p, d) in &log {
        if let Decision::Send { never_sent, dirty } = *d {
            assert!(never_sent + dirty <= 100);
            if p.epoch > 0 && p.never_sent >= 50 && p.dirty >= 50 {
                assert_eq!((never_sent, dirty), (50, 50), "at {p:?}");
                split_cycles += 1;
            }
        }
    }
    assert!(split_cycles > 10, "only {split_cycles} multiplexed cycles");
}

#[test]
fn membound_epoch0_sends_only_never_sent() {
    let (out, log) = run(PolicyKind::Membound, &policy_cfg(), sim_cfg(dirty_all(1.0)));
    assert_eq!(out.end, SimEnd::Completed);
    let epoch0: Vec<_> = log.iter().filter(|(p, _)| p.epoch == 0).collect();
    assert!(epoch0.len() > 5);
    for (p, d) in epoch0 {
        match *d {
            Decision::Send { dirty, never_sent } => {
                assert_eq!(dirty, 0);
                assert_eq!(never_sent, 100.min(p.never_sent));
            }
            Decision::Harvest => assert!(p.since_harvest >= Duration::from_millis(200)),
            ref other => panic!("unexpected {other:?} in epoch 0"),
        }
    }
}

#[test]
fn membound_harvest_cadence_follows_epoch() {
    let cfg = policy_cfg();
    let sim = sim_cfg(dirty_all(0.8));
    let cycle_secs = 100.0 / N as f64;
    let (out, log) = run(PolicyKind::Membound, &cfg, sim);
    assert_eq!(out.end, SimEnd::Completed);
    assert!(out.epochs >= 5, "{} epochs", out.epochs);
    let mut harvest_times = Vec::new();
    for (p, d) in &log {
        let due = p.since_harvest >= cfg.epoch;
        if *d == Decision::Harvest {
            assert!(due, "early harvest at {p:?}");
            harvest_times.push(p.elapsed.as_secs_f64());
        } else if *d != Decision::Switchover {
            assert!(!due, "harvest due but got {d:?} at {p:?}");
        }
    }
    assert_eq!(harvest_times.len() as u32, out.epochs);
    let mut prev = 0.0;
    for t in harvest_times {
        let gap = t - prev;
        // One epoch, late by at most one cycle plus the previous harvest's cost.
        assert!(
            gap >= 0.2 - 1e-9 && gap <= 0.2 + cycle_secs + 0.001 + 1e-9,
            "gap {gap}"
        );
        prev = t;
    }
}

#[test]
fn membound_finishes_within_bound_when_dirty_rate_exceeds_link() {
    for times_link in [1.0, 2.0, 4.0] {
        let cfg = policy_cfg();
        let mut sim = sim_cfg(dirty_all(times_link));
        sim.harvest_cost = Duration::ZERO;
        let (out, _) = run(PolicyKind::Membound, &tight(&cfg), sim.clone());
        assert_eq!(out.end, SimEnd::Completed);
        assert!(out.consistent);
        assert_within_bound(PolicyKind::Membound, &tight(&cfg), &sim, &out);
        // Dirty-all: the live phase resends about as many pages as it first-sends.
        assert!(out.live_pages > N * 3 / 2, "{out:?}");

        // With realistic costs and the default allowance.
        let mut sim = sim_cfg(dirty_all(times_link));
        sim.switchover_cost = Duration::from_millis(500);
        let (out, _) = run(PolicyKind::Membound, &cfg, sim.clone());
        assert_within_bound(PolicyKind::Membound, &cfg, &sim, &out);
    }
}

#[test]
fn membound_idle_vm_sends_each_page_once() {
    let (out, log) = run(
        PolicyKind::Membound,
        &policy_cfg(),
        sim_cfg(DirtyModel::Idle),
    );
    assert_eq!(out.end, SimEnd::Completed);
    assert_eq!(out.pages_sent, N);
    assert_eq!(out.final_pages, 0);
    assert_eq!(out.empty_sends, 0);
    assert!(log.iter().all(|(_, d)| !matches!(d, Decision::Abort(_))));
}

#[test]
fn membound_empty_vm_switches_over_at_once() {
    let mut m = Membound::new(PolicyConfig::default());
    let p = Progress::default();
    assert_eq!(m.decide(&p), Decision::Switchover);
}

#[test]
fn membound_zero_epoch_still_makes_progress() {
    let cfg = PolicyConfig {
        epoch: Duration::ZERO,
        ..PolicyConfig::default()
    };
    assert!(cfg.validate().is_err());
    let (out, log) = run(PolicyKind::Membound, &cfg, sim_cfg(dirty_all(0.5)));
    assert_eq!(out.end, SimEnd::Completed);
    // Harvests and sends alternate.
    for w in log.windows(2) {
        assert!(!(w[0].1 == Decision::Harvest && w[1].1 == Decision::Harvest));
    }
}

#[test]
fn membound_timeout_hurries_or_aborts() {
    let base = PolicyConfig {
        timeout: Some(Duration::from_millis(1500)),
        ..policy_cfg()
    };
    let (out, log) = run(PolicyKind::Membound, &base, sim_cfg(dirty_all(2.0)));
    assert_eq!(out.end, SimEnd::Completed);
    assert!(out.consistent && !out.converged);
    for (p, d) in &log {
        if p.elapsed > Duration::from_millis(1500) {
            assert!(
                matches!(d, Decision::Send { dirty: 0, .. } | Decision::Switchover),
                "{d:?}"
            );
        }
    }

    let cfg = PolicyConfig {
        on_limit: OnLimit::Abort,
        ..base
    };
    let (out, _) = run(PolicyKind::Membound, &cfg, sim_cfg(dirty_all(2.0)));
    assert!(
        matches!(out.end, SimEnd::Aborted(ref why) if why.contains("timeout")),
        "{out:?}"
    );
    // A timeout shorter than the bound voids the promise.
    assert_eq!(bound(PolicyKind::Membound, 1 << 30, 1e8, 0.0, &cfg), None);
}

// ---- precopy ----

#[test]
fn precopy_converges_when_dirty_rate_is_well_below_bandwidth() {
    let cfg = policy_cfg();
    let sim = sim_cfg(DirtyModel::Uniform {
        rate: 400.0,
        working_set: N / 4,
    });
    let (out, log) = run(PolicyKind::Precopy, &cfg, sim.clone());
    assert_eq!(out.end, SimEnd::Completed);
    assert!(out.converged && out.consistent, "{out:?}");
    assert!(out.downtime <= cfg.max_downtime, "{out:?}");
    assert!(out.epochs < cfg.max_epochs);
    assert_within_bound(PolicyKind::Precopy, &cfg, &sim, &out);
    // Pass 0 sends every page once, in chunks, before any harvest.
    let first_harvest = log
        .iter()
        .position(|(_, d)| *d == Decision::Harvest)
        .unwrap();
    assert_eq!(log[first_harvest].0.never_sent, 0);
    assert!(log[..first_harvest]
        .iter()
        .all(|(_, d)| matches!(d, Decision::Send { dirty: 0, never_sent } if *never_sent <= 100)));
}

#[test]
fn precopy_passes_resend_what_was_dirty_at_the_harvest() {
    let cfg = PolicyConfig {
        max_downtime: Duration::from_millis(1),
        max_epochs: 5,
        ..policy_cfg()
    };
    let (out, log) = run(PolicyKind::Precopy, &cfg, sim_cfg(dirty_all(0.5)));
    assert_eq!(out.end, SimEnd::Completed);
    assert_eq!(out.epochs, 5);
    let mut pass: Option<(u64, u64)> = None; // (dirty at harvest, sent so far)
    for (p, d) in &log {
        if p.epoch == 0 {
            continue;
        }
        match *d {
            Decision::Send { never_sent, dirty } => {
                assert_eq!(never_sent, 0);
                let (at_harvest, sent) = pass.get_or_insert((p.dirty, 0));
                *sent += dirty;
                assert!(*sent <= *at_harvest);
            }
            Decision::Harvest => {
                let (at_harvest, sent) = pass.take().unwrap();
                assert_eq!(sent, at_harvest);
            }
            _ => {}
        }
    }
}

#[test]
fn precopy_does_not_converge_above_bandwidth() {
    let cfg = policy_cfg();
    let mut sim = sim_cfg(dirty_all(2.0));
    sim.harvest_cost = Duration::ZERO;
    let (out, log) = run(PolicyKind::Precopy, &tight(&cfg), sim.clone());
    assert_eq!(out.end, SimEnd::Completed);
    assert!(!out.converged && out.consistent);
    assert_eq!(out.epochs, cfg.max_epochs);
    assert!(out.downtime > cfg.max_downtime);
    assert_eq!(log.last().unwrap().0.epoch, cfg.max_epochs);
    assert_within_bound(PolicyKind::Precopy, &tight(&cfg), &sim, &out);

    let abort = PolicyConfig {
        on_limit: OnLimit::Abort,
        ..cfg
    };
    let (out, _) = run(PolicyKind::Precopy, &abort, sim_cfg(dirty_all(2.0)));
    assert!(
        matches!(out.end, SimEnd::Aborted(ref why) if why.contains("did not converge in 30 epochs")),
        "{out:?}"
    );
    assert_eq!(out.epochs, 30);
    assert_eq!(bound(PolicyKind::Precopy, 1 << 30, 1e8, 0.0, &abort), None);
}

#[test]
fn precopy_timeout() {
    let cfg = PolicyConfig {
        timeout: Some(Duration::from_secs(3)),
        ..tight(&policy_cfg())
    };
    let mut sim = sim_cfg(dirty_all(2.0));
    sim.harvest_cost = Duration::ZERO;
    let (out, _) = run(PolicyKind::Precopy, &cfg, sim.clone());
    assert_eq!(out.end, SimEnd::Completed);
    assert!(!out.converged);
    assert!(
        out.live < Duration::from_secs(3) + Duration::from_millis(50),
        "{out:?}"
    );
    assert_within_bound(PolicyKind::Precopy, &cfg, &sim, &out);

    // A timeout during the first pass: it still completes the pass before switching over.
    let short = PolicyConfig {
        timeout: Some(Duration::from_millis(100)),
        ..cfg.clone()
    };
    let (out, _) = run(PolicyKind::Precopy, &short, sim.clone());
    assert_eq!(out.end, SimEnd::Completed);
    assert_eq!(out.epochs, 0);
    assert!(out.consistent);
    assert_within_bound(PolicyKind::Precopy, &short, &sim, &out);

    let abort = PolicyConfig {
        on_limit: OnLimit::Abort,
        ..short
    };
    let (out, _) = run(PolicyKind::Precopy, &abort, sim);
    assert!(matches!(out.end, SimEnd::Aborted(ref why) if why.contains("timeout")));
}

// ---- bound, config, forecasts ----

#[test]
fn bound_figures() {
    let cfg = PolicyConfig::default();
    let gib = 1u64 << 30;
    let pages = gib / 4096;
    assert_eq!(
        bound_pages(PolicyKind::Membound, pages, &cfg),
        Some(3 * pages)
    );
    assert_eq!(
        bound_pages(PolicyKind::Precopy, pages, &cfg),
        Some(31 * pages)
    );
    // 1 GiB at 1 Gbit/s, worst-case page cost: 3 passes × 8.65 s × 1.1 + 2 s + 1 s.
    let b = bound(PolicyKind::Membound, gib, 125e6, 0.0, &cfg).unwrap();
    let expect = 3.0 * pages as f64 * WORST_WIRE_BYTES_PER_PAGE as f64 / 125e6 * 1.1 + 3.0;
    assert!((b.as_secs_f64() - expect).abs() < 1e-6, "{b:?}");
    // Compressible memory: a measured 1 KiB per page.
    let b = bound(PolicyKind::Membound, gib, 125e6, 1024.0, &cfg).unwrap();
    assert!(b < Duration::from_secs(11));
    assert_eq!(bound(PolicyKind::Membound, gib, 0.0, 0.0, &cfg), None);
    assert_eq!(bound(PolicyKind::Membound, gib, f64::NAN, 0.0, &cfg), None);
    // Another split: 25% dirty → budget N/3.
    let split = PolicyConfig {
        dirty_share: 0.25,
        ..cfg.clone()
    };
    assert_eq!(bound_pages(PolicyKind::Membound, 300, &split), Some(700));
    // Precopy with a timeout: the timeout caps the bound.
    let timed = PolicyConfig {
        timeout: Some(Duration::from_secs(10)),
        ..cfg
    };
    let with = bound(PolicyKind::Precopy, gib, 125e6, 0.0, &timed).unwrap();
    let without = bound(
        PolicyKind::Precopy,
        gib,
        125e6,
        0.0,
        &PolicyConfig::default(),
    )
    .unwrap();
    assert!(with < without);
    assert!(with > Duration::from_secs(10));
}

#[test]
fn policy_kind_names() {
    for kind in [PolicyKind::Membound, PolicyKind::Precopy] {
        assert_eq!(kind.to_string().parse::<PolicyKind>(), Ok(kind));
        assert_eq!(
            make_policy(kind, &PolicyConfig::default()).name(),
            kind.as_str()
        );
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
        assert_eq!(serde_json::from_str::<PolicyKind>(&json).unwrap(), kind);
    }
    assert!("auto-converge".parse::<PolicyKind>().is_err());
    assert_eq!(PolicyKind::default(), PolicyKind::Membound);
}

#[test]
fn config_defaults_validate_and_deserialize() {
    let cfg = PolicyConfig::default();
    assert_eq!(cfg.validate(), Ok(()));
    assert_eq!((cfg.cycle_pages, cfg.max_epochs), (100, 30));
    assert_eq!(cfg.dirty_share, 0.5);
    assert_eq!(cfg.epoch, Duration::from_secs(3));
    assert_eq!(cfg.max_downtime, Duration::from_millis(300));
    assert_eq!((cfg.timeout, cfg.on_limit), (None, OnLimit::Switchover));
    let partial: PolicyConfig =
        serde_json::from_str(r#"{"cycle_pages": 256, "on_limit": "abort"}"#).unwrap();
    assert_eq!(partial.cycle_pages, 256);
    assert_eq!(partial.on_limit, OnLimit::Abort);
    assert_eq!(partial.max_epochs, 30);
    for bad in [
        PolicyConfig {
            cycle_pages: 0,
            ..PolicyConfig::default()
        },
        PolicyConfig {
            dirty_share: 1.0,
            ..PolicyConfig::default()
        },
        PolicyConfig {
            dirty_share: f64::NAN,
            ..PolicyConfig::default()
        },
        PolicyConfig {
            bound_slack: 0.9,
            ..PolicyConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    // An unchecked dirty_share of 1 still leaves one never-sent page per cycle.
    let mut m = Membound::new(PolicyConfig {
        dirty_share: 1.0,
        ..PolicyConfig::default()
    });
    assert_eq!(
        m.decide(&progress(1, 1000, 1000)),
        Decision::Send {
            never_sent: 1,
            dirty: 99
        }
    );
}

#[test]
fn forecasts_are_sane() {
    let workloads = [
        DirtyModel::Uniform {
            rate: 4000.0,
            working_set: N,
        },
        dirty_all(0.5),
        DirtyModel::HotCold {
            rate: 8000.0,
            working_set: N,
            hot_pages: 256,
            hot_share: 0.9,
        },
    ];
    for kind in [PolicyKind::Membound, PolicyKind::Precopy] {
        for dirty in workloads.clone() {
            let cfg = policy_cfg();
            let sim = sim_cfg(dirty);
            let unknown = make_policy(kind, &cfg).forecast(&Sim::new(sim.clone()).progress());
            assert!(!unknown.is_known());
            assert_eq!(unknown.fraction_done, 0.0);

            let (out, log) = run(kind, &cfg, sim);
            assert_eq!(out.end, SimEnd::Completed);
            let total = out.total.as_secs_f64();
            // Replay the decisions so the forecasts see the state the policy had at the time.
            let mut replay = make_policy(kind, &cfg);
            let mut last = None;
            for (p, d) in &log {
                let f = replay.forecast(p);
                assert_eq!(replay.decide(p), *d);
                if p.pages_sent == 0 {
                    continue;
                }
                assert!(f.is_known());
                assert!((0.0..=1.0).contains(&f.fraction_done));
                if p.epoch >= 3 {
                    // Once the dirty rate is measured, the ETA holds within 25%.
                    let eta = p.elapsed.as_secs_f64() + f.remaining.as_secs_f64();
                    assert!(
                        (eta / total - 1.0).abs() < 0.25,
                        "{kind} at {p:?}: eta {eta} vs {total}"
                    );
                }
                last = Some(f);
            }
            let last = last.unwrap();
            assert!(last.fraction_done > 0.75, "{kind}: {last:?}");
            let (down, actual) = (last.downtime.as_secs_f64(), out.downtime.as_secs_f64());
            assert!(
                (down - actual).abs() < 0.1 + 0.25 * actual,
                "{kind}: {last:?} vs {out:?}"
            );
        }
    }
}

fn dirty_model() -> impl Strategy<Value = DirtyModel> {
    let rate = 0.0..4.0 * N as f64;
    let ws = 1..=N;
    prop_oneof![
        Just(DirtyModel::Idle),
        (rate.clone(), ws.clone())
            .prop_map(|(rate, working_set)| DirtyModel::Uniform { rate, working_set }),
        (rate.clone(), ws.clone())
            .prop_map(|(rate, working_set)| DirtyModel::Sequential { rate, working_set }),
        (rate, ws, 0..=N, 0.0..=1.0).prop_map(|(rate, working_set, hot_pages, hot_share)| {
            DirtyModel::HotCold {
                rate,
                working_set,
                hot_pages,
                hot_share,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the workload, both policies complete within their bound (page count and time),
    /// and the destination ends with every page's last version.
    #[test]
    fn bound_is_never_exceeded(
        dirty in dirty_model(),
        seed in any::<u64>(),
        epoch_ms in 20u64..2000,
        cycle in 1u64..400,
        share in 0.0..0.9f64,
        precopy in any::<bool>(),
    ) {
        let kind = if precopy { PolicyKind::Precopy } else { PolicyKind::Membound };
        let cfg = tight(&PolicyConfig {
            epoch: Duration::from_millis(epoch_ms),
            cycle_pages: cycle,
            dirty_share: share,
            max_epochs: 8,
            ..PolicyConfig::default()
        });
        let sim = SimConfig {
            pages: 1024,
            bandwidth: 1024.0 * 4096.0,
            harvest_cost: Duration::ZERO,
            seed,
            dirty,
            ..SimConfig::default()
        };
        let (out, log) = run(kind, &cfg, sim.clone());
        prop_assert_eq!(&out.end, &SimEnd::Completed);
        prop_assert!(out.consistent);
        prop_assert_eq!(out.empty_sends, 0);
        assert_within_bound(kind, &cfg, &sim, &out);
        if kind == PolicyKind::Membound {
            prop_assert!(log.iter().all(|(p, d)| (*d == Decision::Switchover) == (p.never_sent == 0)));
        }
    }
}
