//! Policy tests, driven by the simulator with a virtual clock.

use std::time::Duration;

use proptest::prelude::*;

use super::sim::{simulate, DirtyModel, Recorder, Sim, SimConfig, SimEnd, SimOutcome};
use super::*;

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
        timebound_epoch: Duration::from_millis(200),
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

/// What the probe measures of [`dirty_all`]`(times_link)`: a drift over all of memory.
fn sweep_probe(times_link: f64) -> WriteModel {
    WriteModel {
        rate: 0.0,
        wss: 0.0,
        drift: times_link * N as f64,
        memory: N as f64,
        touched: None,
    }
}

fn run(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    sim: SimConfig,
) -> (SimOutcome, Vec<(Progress, Decision)>) {
    let mut rec = Recorder::new(make_policy(kind, cfg));
    let out = simulate(sim, &mut rec);
    (out, rec.log)
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
        hot: 0,
        pages_sent: N - never_sent,
        queued: 0,
        bytes_sent: (N - never_sent) * 4096,
        bandwidth: 1e6,
        bytes_per_page: 4096.0,
        paused_bandwidth: 0.0,
        stop_batches: StopBatches::default(),
        dirtied_last_epoch: dirty,
        held_back: 0,
        unharvested: None,
        writes: None,
        sweep_order: None,
        overcommit_ahead: None,
    }
}

/// With a write model, the multiplexing policies forecast a stop-and-copy of what the guest
/// rewrites, not what a linear rate would pile up: a saturated working set of 1000 pages and
/// no drift leave at most those 1000 pages, and a drift adds more.
#[test]
fn forecasts_follow_the_write_model() {
    let mut p = progress(0, N * 3 / 4, 0);
    p.since_harvest = Duration::from_secs(1);
    let ws = WriteModel {
        rate: 1e6,
        wss: 1000.0,
        drift: 0.0,
        memory: N as f64,
        touched: None,
    };
    let page = 4096.0 / 1e6;
    for kind in [PolicyKind::Mplm, PolicyKind::Timebound] {
        let policy = make_policy(kind, &PolicyConfig::default());
        p.writes = Some(ws);
        let saturated = policy.forecast(&p).downtime.as_secs_f64() / page;
        assert!((999.0..=1000.5).contains(&saturated), "{kind}: {saturated}");
        p.writes = Some(WriteModel { drift: 100.0, ..ws });
        let drifting = policy.forecast(&p).downtime.as_secs_f64() / page;
        assert!(
            drifting > saturated + 10.0,
            "{kind}: {drifting} vs {saturated}"
        );
        // The dirty log has shown 1004 pages touched, no longer growing: the drift has
        // nowhere new to go.
        p.writes = Some(WriteModel {
            drift: 100.0,
            touched: Some(Touched {
                pages: 1004.0,
                rate: 0.0,
            }),
            ..ws
        });
        let capped = policy.forecast(&p).downtime.as_secs_f64() / page;
        assert!(
            (saturated..=1004.5).contains(&capped),
            "{kind}: {capped} vs {saturated}"
        );
    }
}

/// The relative error of the time left forecast when progress first reaches 25% and 50%, as the
/// benchmark matrix measures it: the decisions replayed so each forecast sees the policy's
/// state at the time.
fn eta_errors(kind: PolicyKind, cfg: &PolicyConfig, sim: SimConfig) -> Vec<f64> {
    eta_errors_as(kind, cfg, sim, Progress::clone)
}

/// [`eta_errors`], the forecasts made from what `seen` makes of each progress.
fn eta_errors_as(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    sim: SimConfig,
    seen: impl Fn(&Progress) -> Progress,
) -> Vec<f64> {
    let mut errors = Vec::new();
    at_marks(kind, cfg, sim, seen, |_, _, f, left| {
        errors.push(f.remaining.as_secs_f64() / left - 1.0);
    });
    errors
}

/// Replays the decisions of `kind` over `sim` on a fresh policy, each forecast made from what
/// `seen` makes of the progress; when progress first reaches 25% and 50%, calls `at_mark` with
/// the policy as it stood, that progress, its forecast and the time that was actually left.
fn at_marks(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    sim: SimConfig,
    seen: impl Fn(&Progress) -> Progress,
    mut at_mark: impl FnMut(&dyn Policy, &Progress, &Forecast, f64),
) {
    let (out, log) = run(kind, cfg, sim);
    assert_eq!(out.end, SimEnd::Completed);
    let total = out.total.as_secs_f64();
    let mut replay = make_policy(kind, cfg);
    let mut marks = vec![0.25, 0.5];
    for (p, d) in &log {
        let q = seen(p);
        let f = replay.forecast(&q);
        if f.is_known() && marks.first().is_some_and(|&m| f.fraction_done >= m) {
            marks.remove(0);
            at_mark(&*replay, &q, &f, total - p.elapsed.as_secs_f64());
        }
        assert_eq!(replay.decide(p), *d);
    }
    assert!(marks.is_empty(), "{kind}: never reached {marks:?}");
}

/// A sweep over half of memory, with a period longer than the probe, looks to the probe like a
/// sweep over all of it: the forecasts then count the whole of memory dirty at the end. Read
/// as the migration runs, the dirty log shows the sweep coming back to pages it wrote before,
/// and the touched pages cap the forecasts at what it really covers.
#[test]
fn touched_pages_cap_a_sweep_the_probe_took_for_all_of_memory() {
    // A pass over memory takes 4 s; the sweep covers half of memory every 0.5 s.
    let rate = 4096.0;
    let dirty = DirtyModel::Sequential {
        rate,
        working_set: N / 2,
    };
    let probe = WriteModel {
        rate: 0.0,
        wss: 0.0,
        drift: rate,
        memory: N as f64,
        touched: None,
    };
    let sim = |read_log| SimConfig {
        bandwidth: (N * 4096) as f64 / 4.0,
        writes: Some(probe),
        read_log,
        ..sim_cfg(dirty.clone())
    };
    for kind in [PolicyKind::Mplm, PolicyKind::Membound] {
        let cfg = PolicyConfig::default();
        let blind = eta_errors(kind, &cfg, sim(false));
        let seen = eta_errors(kind, &cfg, sim(true));
        // By 50%, membound has held back the pages the sweep wrote before their first send,
        // and its blind forecast is near too (−4%): they no longer go twice.
        assert!(
            blind[0] > 0.15 && (kind == PolicyKind::Membound || blind[1] > 0.15),
            "{kind}: the probe's model alone over-forecasts: {blind:?}"
        );
        assert!(
            seen.iter().all(|e| e.abs() < 0.1),
            "{kind}: with the touched pages within 10%: {seen:?} (blind {blind:?})"
        );
    }
}

/// A sweep that trails the sends in address order writes only pages already sent, where the
/// write model spreads its writes over sent and never-sent pages alike: blind, the policies
/// forecast too few pages dirty. Read before each forecast, the dirty log shows the pages the
/// next harvest will find, and the model forecasts only the writes to come: the time left at
/// 25% and 50% closer by 5 points or more, within 15% for the multiplexing policies (−21%,
/// −29% blind; −13%, −8% seen), within 25% for autoconverge (−37%, −47%; −22%, −12%).
#[test]
fn the_log_read_between_harvests_shows_a_sweep_that_trails_the_sends() {
    let precopy = PolicyConfig {
        max_downtime: Duration::from_millis(100),
        max_epochs: 60,
        ..policy_cfg()
    };
    let cases = [
        (PolicyKind::Mplm, PolicyConfig::default(), 0.5, 0.15),
        (PolicyKind::Timebound, PolicyConfig::default(), 0.5, 0.15),
        (PolicyKind::Autoconverge, precopy, 0.6, 0.25),
    ];
    for (kind, cfg, rate, within) in cases {
        let probe = sweep_probe(rate);
        let sim = |read_log| SimConfig {
            writes: Some(probe),
            read_log,
            ..sim_cfg(dirty_all(rate))
        };
        let blind = eta_errors(kind, &cfg, sim(false));
        let seen = eta_errors(kind, &cfg, sim(true));
        for (b, s) in blind.iter().zip(&seen) {
            assert!(
                s.abs() <= within && s.abs() + 0.05 <= b.abs(),
                "{kind}: seen {seen:?}, blind {blind:?}"
            );
        }
    }
}

/// A sweeping guest in the simulator, for [`sweep_errors`].
#[derive(Debug, Clone, Copy)]
struct SweepCase {
    /// Its speed, in times the link's ([`dirty_all`]).
    rate: f64,
    /// How long it ran before the migration, and how many times faster meanwhile (the
    /// executor's probe runs before the migration takes cores from the guest).
    warmup: Duration,
    warmup_speed: f64,
    /// How many times its speed the write model takes it for.
    probed: f64,
    /// Seconds the link takes to carry memory once.
    memory_secs: f64,
}

impl SweepCase {
    fn new(rate: f64, warmup: Duration) -> Self {
        Self {
            rate,
            warmup,
            warmup_speed: 1.0,
            probed: 1.0,
            memory_secs: 1.0,
        }
    }
}

/// The ETA errors at 25% and 50% for `kind` over `case`, from eight starting points of the
/// sweep; with the pages followed in the log if `followed`, else the mean model.
fn sweep_errors(kind: PolicyKind, case: SweepCase, followed: bool) -> Vec<f64> {
    let cfg = PolicyConfig {
        epoch: Duration::from_millis(1500),
        timebound_epoch: Duration::from_millis(500),
        ..PolicyConfig::default()
    };
    let rate = case.rate / case.memory_secs;
    let probe = sweep_probe(rate * case.probed);
    errors_from_eight_starts(kind, &cfg, followed, |start| SimConfig {
        writes: Some(probe),
        read_log: true,
        sweep_start: start,
        warmup: case.warmup,
        warmup_speed: case.warmup_speed,
        bandwidth: (N * 4096) as f64 / case.memory_secs,
        ..sim_cfg(dirty_all(rate))
    })
}

/// The ETA errors at 25% and 50% for `kind` over the simulations `sim(start)` makes for eight
/// starting points of a sweep; with the pages followed in the log if `followed`, else the
/// mean model.
fn errors_from_eight_starts(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    followed: bool,
    sim: impl Fn(u64) -> SimConfig,
) -> Vec<f64> {
    (0..8)
        .flat_map(|k| {
            eta_errors_as(kind, cfg, sim(k * N / 8 + 100), |p| Progress {
                sweep_order: p.sweep_order.clone().filter(|_| followed),
                ..p.clone()
            })
        })
        .collect()
}

/// The mean of the errors' sizes.
fn mean_abs(errors: &[f64]) -> f64 {
    errors.iter().map(|e| e.abs()).sum::<f64>() / errors.len() as f64
}

/// Asserts that over `case`, the forecast that follows the pages is off by at most `within`
/// on average, and at least `by` times less than the mean model.
fn assert_followed_beats_mean(kind: PolicyKind, case: SweepCase, within: f64, by: f64) {
    let followed = sweep_errors(kind, case, true);
    let mean = sweep_errors(kind, case, false);
    let (f, m) = (mean_abs(&followed), mean_abs(&mean));
    assert!(
        f <= within && f * by <= m,
        "{kind} over {case:?}: followed {followed:?} ({f:.3}), mean model {mean:?} ({m:.3})"
    );
}

/// A sweep's next writes fall where it stands against the sends: the mean model forecasts
/// them from the average alone and misses by tens of percent either way, depending on where
/// the sweep started. Followed page by page in the dirty log, they come out within a few
/// percent on average. Timebound (harvests ahead) and mplm (none), over a sweep slower and
/// faster than the link, from eight starting points each: the time left at 25% and 50% off
/// by 3–6% on average, at most 12–27% (15–19%, at most 32–70%, from the mean model).
#[test]
fn a_sweep_is_followed_page_by_page() {
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        for rate in [0.7, 1.2] {
            let case = SweepCase::new(rate, Duration::from_secs(2));
            assert_followed_beats_mean(kind, case, 0.08, 1.5);
        }
    }
}

/// A sweep over all of memory that has not come round yet (begun three quarters of a period
/// before the migration) is followed page by page from the start, taken over all of memory,
/// rather than once it stops growing, when most marks have passed. Measured: 5% (timebound)
/// and 1% (mplm) off on average, against 17% and 15% from the mean model; the same as the
/// mean model when it waited.
#[test]
fn a_sweep_about_to_cover_memory_is_followed() {
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        let rate = 0.7;
        let case = SweepCase::new(rate, Duration::from_secs_f64(0.75 / rate));
        assert_followed_beats_mean(kind, case, 0.1, 1.5);
    }
}

/// The executor's probe runs the guest before the migration takes cores from it: on the
/// testbed, `dirty-all` swept a third of memory in the probe's 0.3 s, two to three times
/// faster than during the migration. Dated by their last writes, a period apart, the pages the
/// probe saw came due much later than they were: the forecast was off by 16–25% on average
/// in the simulator, worse than the mean model (15–19%). In the sweep's order, from where it
/// stands: 0–7% (0.3 s at 2.5 ×, timebound and mplm, over a sweep slower and faster than the
/// link, from eight starting points each).
#[test]
fn a_sweep_faster_before_the_migration_is_followed_in_its_order() {
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        for rate in [0.7, 1.2] {
            let case = SweepCase {
                warmup_speed: 2.5,
                ..SweepCase::new(rate, Duration::from_millis(300))
            };
            assert_followed_beats_mean(kind, case, 0.08, 1.5);
        }
    }
}

/// The write model's speed is the probe's, scaled by the vCPUs' CPU time since. On the testbed,
/// a `dirty-all` guest wrote twice as many pages per CPU-second in the second half of the
/// migration as in the probe. Taken at the speed the log shows it moving on, read after read,
/// a sweep the model takes for half as fast as it is is forecast about as well as one the
/// model has right (timebound and mplm over a sweep slower and faster than the link, a 3 s
/// migration, eight starting points each): 6–10% off on average against 3–10% with the model
/// right (the faster sweep comes round during the migration, and after its first lap the
/// model's speed is kept); 17–22% at the model's speed, 18–20% from the mean model. (With
/// each resend counted off the pages dirty at the last harvest, before
/// `SweepEnd::resent_in_turn`: 4–11% against 4–9%.) MPLM over the slower sweep also needs
/// the live phase no longer than the resends that come ([`super::multiplexed_forecast`]):
/// with every share of resends taken filled, 25% with the model right.
#[test]
fn a_sweep_faster_than_its_model_is_followed_at_the_speed_the_log_shows() {
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        for rate in [0.7, 1.2] {
            let right = SweepCase {
                memory_secs: 3.0,
                ..SweepCase::new(rate, Duration::from_millis(300))
            };
            let off = SweepCase {
                probed: 0.5,
                ..right
            };
            let followed = sweep_errors(kind, off, true);
            let (f, r) = (
                mean_abs(&followed),
                mean_abs(&sweep_errors(kind, right, true)),
            );
            let m = mean_abs(&sweep_errors(kind, off, false));
            assert!(
                f <= r + 0.035 && f <= 0.12 && f * 1.5 <= m,
                "{kind} over {off:?}: {followed:?} ({f:.3}); model right {r:.3}, mean model {m:.3}"
            );
        }
    }
}

/// The error of `kind`'s time left at its first decision after the first harvest, when it
/// starts the first dirty pass, over `sim`; with the pages followed in the log if `followed`.
fn eta_error_after_first_pass(
    kind: PolicyKind,
    cfg: &PolicyConfig,
    sim: SimConfig,
    followed: bool,
) -> f64 {
    let (out, log) = run(kind, cfg, sim);
    assert_eq!(out.end, SimEnd::Completed, "{kind}");
    let total = out.total.as_secs_f64();
    let mut replay = make_policy(kind, cfg);
    for (p, d) in &log {
        let seen = Progress {
            sweep_order: p.sweep_order.clone().filter(|_| followed),
            ..p.clone()
        };
        let f = replay.forecast(&seen);
        assert_eq!(replay.decide(p), *d);
        if p.epoch == 1 && p.never_sent == 0 {
            return f.remaining.as_secs_f64() / (total - p.elapsed.as_secs_f64()) - 1.0;
        }
    }
    panic!("{kind}: no dirty pass");
}

/// A dirty pass resends the pages behind a sweep while it writes those ahead, sent before and
/// clean: each is dirty at the pass's end. The mean model spreads the writes over the pass's
/// pages too, forecasts fewer, and passes that shrink faster than they do (on the testbed,
/// autoconverge's ETA on `dirty-all` was 26–45% short at 25%). Precopy and autoconverge over a
/// sweep of all memory at 0.7, 0.5 and 0.35 × the link's rate, from eight starting points,
/// the time left when the first dirty pass starts: measured 5.3–5.6%, 2.2–2.4% and 2.4% off
/// on average with the sweep followed (6.7% at 0.7 counting only the pages ahead of it),
/// 17–24%, 7–10% and 5.6% short from the mean model.
#[test]
fn a_dirty_pass_leaves_what_the_sweep_writes_ahead_of_it() {
    let cfg = PolicyConfig {
        max_downtime: Duration::from_millis(20),
        ..policy_cfg()
    };
    for kind in [PolicyKind::Precopy, PolicyKind::Autoconverge] {
        for rate in [0.7, 0.5, 0.35] {
            let errors = |followed| {
                (0..8)
                    .map(|k| {
                        let sim = SimConfig {
                            writes: Some(sweep_probe(rate)),
                            read_log: true,
                            sweep_start: k * N / 8 + 100,
                            warmup: Duration::from_secs(2),
                            ..sim_cfg(dirty_all(rate))
                        };
                        eta_error_after_first_pass(kind, &cfg, sim, followed)
                    })
                    .collect::<Vec<_>>()
            };
            let (followed, mean) = (errors(true), errors(false));
            let (f, m) = (mean_abs(&followed), mean_abs(&mean));
            assert!(
                f <= 0.06 && f * 2.0 <= m,
                "{kind} at {rate}: followed {followed:.3?} ({f:.3}), mean model {mean:.3?} ({m:.3})"
            );
        }
    }
}

/// Mplm's and precopy's forecasts with `dirty` pages left for the stop-and-copy (precopy
/// stops with a few hundred of them at a 1 s target), as measured and as `with` changes the
/// measurement.
fn stop_and_copy_forecasts(
    dirty: u64,
    with: impl Fn(&Progress) -> Progress,
) -> Vec<(PolicyKind, Forecast, Forecast)> {
    let p = progress(1, 0, dirty);
    let cfg = PolicyConfig {
        max_downtime: Duration::from_secs(1),
        ..policy_cfg()
    };
    [PolicyKind::Mplm, PolicyKind::Precopy]
        .into_iter()
        .map(|kind| {
            let policy = make_policy(kind, &cfg);
            (kind, policy.forecast(&p), policy.forecast(&with(&p)))
        })
        .collect()
}

/// The stop-and-copy is forecast at the rate the probe measured with the vCPUs stopped when
/// that is faster than the live phase's, the live pages at the live rate; never slower.
#[test]
fn the_stop_and_copy_is_forecast_at_the_paused_rate() {
    // 100 pages, 409.6 ms at the live rate.
    let faster = stop_and_copy_forecasts(100, |p| Progress {
        paused_bandwidth: 2e6,
        ..p.clone()
    });
    for (kind, live, paused) in faster {
        let ratio = paused.downtime.as_secs_f64() / live.downtime.as_secs_f64();
        assert!((ratio - 0.5).abs() < 1e-9, "{kind}: {live:?} vs {paused:?}");
    }
    let slower = stop_and_copy_forecasts(100, |p| Progress {
        paused_bandwidth: 0.5e6,
        ..p.clone()
    });
    for (kind, live, slower) in slower {
        assert_eq!(slower.downtime, live.downtime, "{kind}");
    }
}

/// A stop-and-copy smaller than a few batches a worker is cut into batches of a few dozen
/// pages, and its forecast waits for the first of them to be encoded.
#[test]
fn the_stop_and_copy_waits_for_its_first_batch() {
    let b = StopBatches {
        workers: 2,
        max_pages: 256,
        encode_page_time: 13e-6,
    };
    assert_eq!(b.batch(218), 28);
    assert_eq!(b.batch(10), 16);
    assert_eq!(b.batch(100_000), 256);
    assert_eq!(b.fill(0.0), 0.0);
    assert!((b.fill(10.0) - 10.0 * 13e-6).abs() < 1e-12);
    assert!((b.fill(218.0) - 28.0 * 13e-6).abs() < 1e-12);
    // At most one batch of the largest size, however large the stop-and-copy.
    assert!((b.fill(1e6) - 256.0 * 13e-6).abs() < 1e-12);

    let batched = stop_and_copy_forecasts(218, |p| Progress {
        stop_batches: b,
        ..p.clone()
    });
    for (kind, alone, batched) in batched {
        let wait = batched.downtime.as_secs_f64() - alone.downtime.as_secs_f64();
        assert!(
            (wait - b.fill(218.0)).abs() < 1e-6,
            "{kind}: {alone:?} vs {batched:?}"
        );
        assert_eq!(
            batched.remaining - alone.remaining,
            batched.downtime - alone.downtime
        );
    }
}

// ---- mplm ----

#[test]
fn mplm_switches_over_exactly_when_never_sent_empties() {
    let cfg = policy_cfg();
    let sim = sim_cfg(DirtyModel::Uniform {
        rate: 2000.0,
        working_set: N / 2,
    });
    let (out, log) = run(PolicyKind::Mplm, &cfg, sim);
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
fn mplm_cycle_split_is_exact() {
    let mut m = Mplm::new(PolicyConfig::default());
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
    let mut m = Mplm::new(PolicyConfig {
        cycle_pages: 64,
        dirty_share: 0.25,
        ..PolicyConfig::default()
    });
    assert_eq!(m.decide(&progress(3, 1000, 1000)), send(48, 16));

    // In a whole simulated migration: every cycle with both groups plentiful is 50/50.
    let (out, log) = run(PolicyKind::Mplm, &policy_cfg(), sim_cfg(dirty_all(0.5)));
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
fn mplm_epoch0_sends_only_never_sent() {
    let (out, log) = run(PolicyKind::Mplm, &policy_cfg(), sim_cfg(dirty_all(1.0)));
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
fn mplm_harvest_cadence_follows_epoch() {
    let cfg = policy_cfg();
    let sim = sim_cfg(dirty_all(0.8));
    let cycle_secs = 100.0 / N as f64;
    let (out, log) = run(PolicyKind::Mplm, &cfg, sim);
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
fn mplm_finishes_within_bound_when_dirty_rate_exceeds_link() {
    for times_link in [1.0, 2.0, 4.0] {
        let cfg = policy_cfg();
        let mut sim = sim_cfg(dirty_all(times_link));
        sim.harvest_cost = Duration::ZERO;
        let (out, _) = run(PolicyKind::Mplm, &tight(&cfg), sim.clone());
        assert_eq!(out.end, SimEnd::Completed);
        assert!(out.consistent);
        assert_within_bound(PolicyKind::Mplm, &tight(&cfg), &sim, &out);
        // Dirty-all: the live phase resends pages (here a third as many as it first-sends;
        // pages written before their send go with it).
        assert!(out.live_pages > N * 5 / 4, "{out:?}");

        // With realistic costs and the default allowance.
        let mut sim = sim_cfg(dirty_all(times_link));
        sim.switchover_cost = Duration::from_millis(500);
        let (out, _) = run(PolicyKind::Mplm, &cfg, sim.clone());
        assert_within_bound(PolicyKind::Mplm, &cfg, &sim, &out);
    }
}

#[test]
fn mplm_idle_vm_sends_each_page_once() {
    let (out, log) = run(PolicyKind::Mplm, &policy_cfg(), sim_cfg(DirtyModel::Idle));
    assert_eq!(out.end, SimEnd::Completed);
    assert_eq!(out.pages_sent, N);
    assert_eq!(out.final_pages, 0);
    assert_eq!(out.empty_sends, 0);
    assert!(log.iter().all(|(_, d)| !matches!(d, Decision::Abort(_))));
}

#[test]
fn mplm_empty_vm_switches_over_at_once() {
    let mut m = Mplm::new(PolicyConfig::default());
    let p = Progress::default();
    assert_eq!(m.decide(&p), Decision::Switchover);
}

#[test]
fn mplm_zero_epoch_still_makes_progress() {
    let cfg = PolicyConfig {
        epoch: Duration::ZERO,
        ..PolicyConfig::default()
    };
    assert!(cfg.validate().is_err());
    let (out, log) = run(PolicyKind::Mplm, &cfg, sim_cfg(dirty_all(0.5)));
    assert_eq!(out.end, SimEnd::Completed);
    // Harvests and sends alternate.
    for w in log.windows(2) {
        assert!(!(w[0].1 == Decision::Harvest && w[1].1 == Decision::Harvest));
    }
}

#[test]
fn mplm_timeout_hurries_or_aborts() {
    let base = PolicyConfig {
        timeout: Some(Duration::from_millis(1000)),
        ..policy_cfg()
    };
    let (out, log) = run(PolicyKind::Mplm, &base, sim_cfg(dirty_all(2.0)));
    assert_eq!(out.end, SimEnd::Completed);
    assert!(out.consistent && !out.converged);
    for (p, d) in &log {
        if p.elapsed > Duration::from_millis(1000) {
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
    let (out, _) = run(PolicyKind::Mplm, &cfg, sim_cfg(dirty_all(2.0)));
    assert!(
        matches!(out.end, SimEnd::Aborted(ref why) if why.contains("timeout")),
        "{out:?}"
    );
    // A timeout shorter than the bound voids the promise.
    assert_eq!(bound(PolicyKind::Mplm, 1 << 30, 1e8, 0.0, &cfg), None);
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

/// A guest writing `rate` pages/s at random over its first `working_set` pages, and the write
/// model of it the probe would give, `model` × too fast.
fn random_writes(rate: f64, working_set: u64, model: f64) -> SimConfig {
    SimConfig {
        writes: Some(WriteModel {
            rate: model * rate,
            wss: working_set as f64,
            drift: 0.0,
            memory: N as f64,
            touched: None,
        }),
        ..sim_cfg(DirtyModel::Uniform { rate, working_set })
    }
}

/// A write model that says the guest writes twice as fast as it does: after the first dirty
/// pass's harvest, precopy fits the model's speed to what the pass left dirty, and forecasts
/// the time left within 20% (−2%; the model as it came: +1762%, a pass that barely shrinks).
#[test]
fn precopy_fits_the_write_model_to_its_harvests() {
    let cfg = PolicyConfig {
        max_downtime: Duration::from_millis(100),
        ..policy_cfg()
    };
    let (out, log) = run(PolicyKind::Precopy, &cfg, random_writes(4000.0, N / 2, 2.0));
    assert!(out.converged && out.epochs >= 3, "{out:?}");
    // The forecast before the second decision of epoch 2: the first evaluated its harvest.
    let mut replay = Precopy::new(cfg.clone());
    let mut seen = 0;
    let (p, _) = log
        .iter()
        .find(|(p, _)| {
            seen += u32::from(p.epoch == 2);
            seen == 2 || replay.decide(p) == Decision::Switchover
        })
        .expect("a harvest");
    let left = out.total.as_secs_f64() - p.elapsed.as_secs_f64();
    let error = |policy: &Precopy| policy.forecast(p).remaining.as_secs_f64() / left - 1.0;
    let (fitted, unfitted) = (error(&replay), error(&Precopy::new(cfg.clone())));
    assert!(fitted.abs() <= 0.2, "{fitted}");
    assert!(unfitted > 1.0, "{unfitted}");
}

/// When precopy (and autoconverge, which decides through it) switches over, its downtime
/// forecast is the dirty set it stops with, not the pass it would have sent next.
#[test]
fn precopy_forecasts_the_set_it_switches_over_with() {
    let cfg = PolicyConfig {
        max_downtime: Duration::from_secs(1),
        ..policy_cfg()
    };
    // 100 dirty pages at 4096 bytes each over 1 MB/s: 409.6 ms, within the 1 s target.
    let p = progress(1, 0, 100);
    for mut policy in [
        Box::new(Precopy::new(cfg.clone())) as Box<dyn Policy>,
        Box::new(Autoconverge::new(cfg.clone())),
    ] {
        assert_eq!(policy.decide(&p), Decision::Switchover, "{}", policy.name());
        let f = policy.forecast(&p);
        assert!(
            (f.downtime.as_secs_f64() - 0.4096).abs() < 1e-6,
            "{}: {f:?}",
            policy.name()
        );
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

// ---- membound ----

fn hotcold() -> DirtyModel {
    DirtyModel::HotCold {
        rate: 8000.0,
        working_set: N,
        hot_pages: 256,
        hot_share: 0.9,
    }
}

/// The issue's target in the simulator: on hotcold and seq (sweeps slower and faster than the
/// link, over all memory and a quarter of it), membound's downtime is at most half of mplm's and
/// its total time no longer, but for a sweep of all memory at twice the link's rate (see below).
#[test]
fn membound_halves_mplm_downtime_without_taking_longer() {
    let seq_quarter = DirtyModel::Sequential {
        rate: 2000.0,
        working_set: N / 4,
    };
    for dirty in [hotcold(), dirty_all(0.5), dirty_all(2.0), seq_quarter] {
        let cfg = policy_cfg();
        let (mplm, _) = run(PolicyKind::Mplm, &cfg, sim_cfg(dirty.clone()));
        let (mb, _) = run(PolicyKind::Membound, &cfg, sim_cfg(dirty.clone()));
        assert!(mb.consistent && mplm.consistent);
        assert!(
            mb.downtime.as_secs_f64() <= 0.5 * mplm.downtime.as_secs_f64(),
            "{dirty:?}: membound {mb:?} vs mplm {mplm:?}"
        );
        // A tail pass costs what mplm's stop-and-copy does; what the guest rewrites during it
        // (under the throttle: about the target's worth) and the tail's two harvests go on
        // top. Only a guest that rewrites all of memory faster than the link leaves membound
        // nothing to save before the tail.
        let slack = if dirty == dirty_all(2.0) {
            cfg.target_downtime + 2 * sim_cfg(dirty.clone()).harvest_cost
        } else {
            Duration::ZERO
        };
        assert!(
            mb.total <= mplm.total + slack,
            "{dirty:?}: membound {mb:?} vs mplm {mplm:?}"
        );
        assert_within_bound(PolicyKind::Membound, &tight(&cfg), &sim_cfg(dirty), &mb);
    }
}

/// While never-sent pages are left, no hot page is resent: a cycle asks for at most the cold
/// dirty pages, and the controls say hot pages wait; in the tail they go too.
#[test]
fn membound_defers_hot_pages_until_the_tail() {
    let cfg = policy_cfg();
    let mut m = Membound::new(cfg.clone());
    let (out, log) = run(PolicyKind::Membound, &cfg, sim_cfg(hotcold()));
    assert_eq!(out.end, SimEnd::Completed);
    let mut saw_hot = false;
    let mut tail_sent_hot = false;
    for (p, d) in &log {
        assert_eq!(m.decide(p), *d);
        let c = m.controls();
        if p.never_sent > 0 {
            assert!(c.defer_hot, "hot pages not deferred at {p:?}");
            if let Decision::Send { dirty, .. } = d {
                assert!(*dirty <= p.dirty - p.hot, "{d:?} at {p:?}");
            }
            saw_hot |= p.hot > 0;
        } else if let Decision::Send { dirty, .. } = d {
            assert!(!c.defer_hot);
            tail_sent_hot |= *dirty > p.dirty - p.hot;
        }
    }
    assert!(saw_hot, "the workload made no hot page");
    assert!(tail_sent_hot, "the tail never resent hot pages");
}

/// The testbed's `seq` 128M: the second vCPU sweeps its working set before the never-sent
/// pages get there. Membound holds those pages back with the hot ones and sends each once, in
/// the tail; mplm sends them as it comes to them and again in the stop-and-copy. Membound
/// sends fewer pages and ends sooner; mplm holds none back.
#[test]
fn membound_sends_once_what_the_guest_wrote_before_its_first_send() {
    let cfg = policy_cfg();
    let sim = SimConfig {
        writes: Some(sweep_probe(0.3)),
        read_log: true,
        vcpus: 2,
        warmup: Duration::from_secs(1),
        bandwidth: (N * 4096) as f64 / 2.4,
        ..sim_cfg(DirtyModel::SequentialEach {
            rate: 0.3 * N as f64,
            working_set: N / 4,
            last_faster: 1.0,
        })
    };
    let (mplm, _) = run(PolicyKind::Mplm, &cfg, sim.clone());
    let (mb, _) = run(PolicyKind::Membound, &cfg, sim.clone());
    assert!(mb.consistent && mplm.consistent);
    assert_eq!(mplm.deferred, 0, "mplm held pages back: {mplm:?}");
    assert!(mb.deferred >= N / 8, "{mb:?}");
    assert!(
        mb.pages_sent + N / 8 <= mplm.pages_sent,
        "membound {mb:?} vs mplm {mplm:?}"
    );
    assert!(mb.total < mplm.total, "membound {mb:?} vs mplm {mplm:?}");
    assert!(mb.downtime.as_secs_f64() <= 0.5 * mplm.downtime.as_secs_f64());
    assert_within_bound(PolicyKind::Membound, &tight(&cfg), &sim, &mb);
}

/// A quiet guest gets a small dirty share (never-sent pages go sooner) and no throttle; a guest
/// that dirties faster than resends can follow resends (almost) nothing live and gets a
/// throttled tail.
#[test]
fn membound_adapts_its_share_and_throttles_only_when_needed() {
    let cfg = policy_cfg();
    let quiet = DirtyModel::Uniform {
        rate: 200.0,
        working_set: N,
    };
    let (out, log) = run(PolicyKind::Membound, &cfg, sim_cfg(quiet));
    assert_eq!(out.max_throttle, 0.0, "{out:?}");
    let shares: Vec<u64> = log
        .iter()
        .filter(|(p, _)| p.epoch >= 2 && p.never_sent >= 100)
        .filter_map(|(p, d)| match d {
            Decision::Send { dirty, .. } if p.dirty - p.hot >= 50 => Some(*dirty),
            _ => None,
        })
        .collect();
    assert!(
        shares.iter().all(|&d| d < 50),
        "quiet guest got MPLM's share: {shares:?}"
    );
    let (fast, log) = run(PolicyKind::Membound, &cfg, sim_cfg(dirty_all(2.0)));
    assert!(fast.max_throttle > 0.5, "{fast:?}");
    // Its writes fall ahead of the never-sent pages (held back) or on pages it rewrites
    // before a resend could stay clean: at most a trickle of cold pages goes live.
    let resent_live: u64 = log
        .iter()
        .filter(|(p, _)| p.epoch >= 2 && p.never_sent >= 100)
        .map(|(_, d)| match d {
            Decision::Send { dirty, .. } => *dirty,
            _ => 0,
        })
        .sum();
    assert!(resent_live <= N / 256, "{resent_live} resent live");
}

/// A small working set rewritten many times between harvests looks like a trickle to the clean
/// rate (few new pages outside it), and a tail pass at that throttle is all rewritten again.
/// With the write model the probe measured, the first pass is throttled enough: one pass, and
/// fewer pages resent than when the tail learns by missing.
#[test]
fn membound_throttles_its_first_tail_pass_for_the_working_set() {
    let cfg = policy_cfg();
    let (wss, writes_per_s) = (256, 12_800.0);
    let dirty = DirtyModel::Uniform {
        rate: writes_per_s,
        working_set: wss,
    };
    let tail = |log: &[(Progress, Decision)]| {
        let harvests = log
            .iter()
            .filter(|(p, d)| p.never_sent == 0 && *d == Decision::Harvest)
            .count();
        let resent: u64 = log
            .iter()
            .filter(|(p, _)| p.never_sent == 0)
            .map(|(_, d)| match d {
                Decision::Send { dirty, .. } => *dirty,
                _ => 0,
            })
            .sum();
        (harvests, resent)
    };
    let (blind, log) = run(PolicyKind::Membound, &cfg, sim_cfg(dirty.clone()));
    let (blind_harvests, blind_resent) = tail(&log);
    let model = WriteModel {
        rate: writes_per_s,
        wss: wss as f64,
        drift: 0.0,
        memory: N as f64,
        touched: None,
    };
    let sim = SimConfig {
        writes: Some(model),
        ..sim_cfg(dirty)
    };
    let (seen, log) = run(PolicyKind::Membound, &cfg, sim);
    let (seen_harvests, seen_resent) = tail(&log);
    assert_eq!(seen.end, SimEnd::Completed);
    assert!(seen.consistent);
    // The first harvest of the tail, then one after its only pass.
    assert_eq!(seen_harvests, 2, "{seen:?}");
    assert!(blind_harvests > seen_harvests, "{blind:?}");
    assert!(
        seen_resent < blind_resent,
        "{seen_resent} vs {blind_resent}"
    );
    assert!(seen.max_throttle > 0.5, "{seen:?}");
    // What the single pass left fits the target.
    assert!(seen.downtime <= cfg.target_downtime, "{seen:?}");
}

// ---- timebound ----

/// TLM: harvests every `timebound_epoch`, the dirty sender gets at most its share of a cycle,
/// the VM stops exactly when the mass transfer ends, within 2.25 N pages whatever the rate.
#[test]
fn timebound_mass_transfer_with_a_dirty_sender() {
    let cfg = PolicyConfig {
        timebound_epoch: Duration::from_millis(250),
        ..PolicyConfig::default()
    };
    for dirty in [dirty_all(0.5), dirty_all(4.0), hotcold()] {
        let sim = sim_cfg(dirty);
        let (out, log) = run(PolicyKind::Timebound, &tight(&cfg), sim.clone());
        assert_eq!(out.end, SimEnd::Completed);
        assert!(out.consistent);
        assert!(out.pages_sent <= N + N / 4 + N, "{out:?}");
        assert_within_bound(PolicyKind::Timebound, &tight(&cfg), &sim, &out);
        let mut last_harvest = Duration::ZERO;
        for (p, d) in &log {
            assert_eq!(*d == Decision::Switchover, p.never_sent == 0);
            match d {
                Decision::Send { never_sent, dirty } if p.never_sent >= 100 => {
                    assert!(*dirty <= 20 && never_sent + dirty <= 100, "{d:?}");
                }
                Decision::Harvest => {
                    let at = p.elapsed;
                    assert!(at - last_harvest >= Duration::from_millis(250));
                    assert!(at - last_harvest < Duration::from_millis(280), "{at:?}");
                    last_harvest = at;
                }
                _ => {}
            }
        }
    }
}

// ---- autoconverge ----

/// QEMU's steps exactly: two epochs in a row above half of what was sent → 20%, then +10%
/// for every further two, capped at 99%; an epoch under the trigger restarts the count.
#[test]
fn autoconverge_throttle_steps_are_exact() {
    let mut a = Autoconverge::new(PolicyConfig::default());
    let mut sent = 0;
    let mut epoch = 0;
    // Feed one harvest: `sent_now` pages sent in the epoch, `dirtied` dirtied in it.
    let mut harvest = |a: &mut Autoconverge, sent_now: u64, dirtied: u64| {
        sent += sent_now;
        epoch += 1;
        let mut p = progress(epoch, 0, dirtied);
        p.pages_sent = sent;
        p.dirtied_last_epoch = dirtied;
        a.decide(&p);
        a.controls().throttle
    };
    assert_eq!(a.controls(), Controls::default());
    assert_eq!(harvest(&mut a, 1000, 600), 0.0); // high 1
    assert_eq!(harvest(&mut a, 1000, 400), 0.0); // under: restart
    assert_eq!(harvest(&mut a, 1000, 501), 0.0); // high 1
    assert_eq!(harvest(&mut a, 1000, 900), 0.2); // high 2 → 20%
    assert_eq!(harvest(&mut a, 1000, 900), 0.2); // high 1
    let t = harvest(&mut a, 1000, 900); // high 2 → 30%
    assert!((t - 0.3).abs() < 1e-9, "{t}");
    assert_eq!(harvest(&mut a, 1000, 500), t); // exactly half is not above it
    let mut last = t;
    for _ in 0..40 {
        last = harvest(&mut a, 1000, 1000);
    }
    assert_eq!(last, 0.99);
    assert!(!a.controls().defer_hot);
}

/// Where plain precopy never converges, auto-converge's throttle lets it.
#[test]
fn autoconverge_converges_where_precopy_does_not() {
    let cfg = policy_cfg();
    let (pre, _) = run(PolicyKind::Precopy, &cfg, sim_cfg(dirty_all(2.0)));
    let (auto, _) = run(PolicyKind::Autoconverge, &cfg, sim_cfg(dirty_all(2.0)));
    assert!(!pre.converged, "{pre:?}");
    assert!(auto.converged && auto.consistent, "{auto:?}");
    assert!(
        auto.max_throttle >= 0.2 && auto.total < pre.total,
        "{auto:?}"
    );
}

/// Auto-converge's forecast steps the throttle by the policy's own rule at every harvest it
/// looks ahead to: where the guest writes at random over all memory twice as fast as the link
/// carries it, the time left at 25% and 50% is within 15% (+22% and +23% when forecast at the
/// throttle in force).
#[test]
fn autoconverge_forecasts_its_throttle_steps() {
    let sim = random_writes(2.0 * N as f64, N, 1.0);
    let errors = eta_errors(PolicyKind::Autoconverge, &policy_cfg(), sim);
    assert!(errors.iter().all(|e| e.abs() <= 0.15), "{errors:?}");
}

/// A guest the throttle does not slow (on this machine, one starved of CPU by the workers and
/// the destination wrote as fast at 50% as unthrottled): two fits of precopy's speed under
/// different throttles measure that, and the forecast stops counting on the steps to come: the
/// time left within 20% (−13%; with the textbook response, −59%).
#[test]
fn autoconverge_measures_how_the_throttle_slows_the_guest() {
    let sim = SimConfig {
        throttle_response: 0.0,
        ..random_writes(0.9 * N as f64, N, 1.0)
    };
    let cfg = PolicyConfig {
        max_downtime: Duration::from_millis(20),
        max_epochs: 100,
        ..policy_cfg()
    };
    let (out, log) = run(PolicyKind::Autoconverge, &cfg, sim);
    assert!(out.converged && out.max_throttle >= 0.3, "{out:?}");
    // The forecast once the second throttle step is in force (before that decision).
    let mut replay = Autoconverge::new(cfg.clone());
    let (p, _) = log
        .iter()
        .find(|(p, _)| replay.throttle() >= 0.3 || replay.decide(p) == Decision::Switchover)
        .expect("a second step");
    let left = out.total.as_secs_f64() - p.elapsed.as_secs_f64();
    let error = replay.forecast(p).remaining.as_secs_f64() / left - 1.0;
    assert!(error.abs() <= 0.2, "{error}");
}

// ---- over-commit ----

/// Four vCPUs packed onto one core from progress `at`, at once.
fn onto_one_core(at: f64) -> Overcommit {
    Overcommit {
        cores: 1,
        at,
        stepwise: false,
        from: 4,
    }
}

/// Cores are packed from the progress mark on (at once, or one fewer per harvest), and given
/// back at the switchover and on abort.
#[test]
fn overcommit_packs_from_the_mark_and_restores() {
    let oc = onto_one_core(0.5);
    let cfg = PolicyConfig::default();
    let mut w = Overcommitted::new(Box::new(Mplm::new(cfg.clone())), oc);
    // The mark is looked at once per 1% of memory sent: not between 49.75% and 50.25%.
    w.decide(&progress(0, N / 2 + N / 400, 0));
    assert_eq!(w.controls().cores, None, "before the mark");
    w.decide(&progress(0, N / 2 - N / 400, 0));
    assert_eq!(
        w.controls().cores,
        None,
        "looked at the mark within 1% of the last look"
    );
    w.decide(&progress(0, N / 4, 0));
    assert_eq!(w.controls().cores, Some(1));
    assert_eq!(w.decide(&progress(1, 0, 0)), Decision::Switchover);
    assert_eq!(w.controls().cores, None, "not restored at switchover");

    let mut step = Overcommitted::new(
        Box::new(Mplm::new(cfg.clone())),
        Overcommit {
            stepwise: true,
            at: 0.0,
            ..oc
        },
    );
    let mut got = Vec::new();
    for epoch in 0..5 {
        let mut p = progress(epoch, N / 2, 0);
        p.pages_sent = N / 2;
        step.decide(&p);
        got.push(step.controls().cores);
    }
    assert_eq!(got, [Some(3), Some(2), Some(1), Some(1), Some(1)]);

    let mut abort = Overcommitted::new(
        Box::new(Mplm::new(PolicyConfig {
            timeout: Some(Duration::from_secs(1)),
            on_limit: OnLimit::Abort,
            ..cfg
        })),
        Overcommit { at: 0.0, ..oc },
    );
    let mut p = progress(1, N / 2, 0);
    p.elapsed = Duration::from_millis(10);
    abort.decide(&p);
    assert_eq!(abort.controls().cores, Some(1));
    p.elapsed = Duration::from_secs(2);
    assert!(matches!(abort.decide(&p), Decision::Abort(_)));
    assert_eq!(abort.controls().cores, None, "not restored on abort");
}

/// Two vCPUs that used 1.9 cores' time keep at most 1 ÷ 1.9 of their speed packed onto one;
/// a guest that used less than the cores left keeps all of it.
#[test]
fn over_commit_leaves_the_vcpus_the_time_of_their_cores() {
    assert!((cores_share(Some(1), 1.9) - 1.0 / 1.9).abs() < 1e-9);
    assert!(
        (cores_share(Some(0), 1.9) - 1.0 / 1.9).abs() < 1e-9,
        "at least one"
    );
    assert_eq!(cores_share(Some(2), 1.9), 1.0);
    assert_eq!(
        cores_share(Some(1), 0.4),
        1.0,
        "a guest using less keeps it all"
    );
    assert_eq!(cores_share(None, 1.9), 1.0, "their own cores");
    assert_eq!(cores_share(Some(1), 0.0), 1.0, "nothing measured");
}

/// A guest foreseen at half its speed writes half as fast and its sweep moves half as fast;
/// the lanes' rate ahead counts for the pages after the mark, each page's time averaged.
#[test]
fn an_over_commit_ahead_slows_the_guest_and_speeds_the_lanes() {
    let mut p = progress(1, N / 2, 100);
    p.bandwidth = 100e6;
    p.writes = Some(WriteModel {
        touched: Some(Touched {
            pages: 500.0,
            rate: 40.0,
        }),
        ..sweep_probe(0.5)
    });
    p.sweep_order = Some(Arc::new(SweepOrder {
        whole: sweep::Part {
            speed: 30.0,
            ..sweep::Part::default()
        },
        ..SweepOrder::default()
    }));
    let q = p.at_speed(0.5);
    let (m, t) = (q.writes.unwrap(), q.writes.unwrap().touched.unwrap());
    assert_eq!((m.drift, t.rate, t.pages), (N as f64 / 4.0, 20.0, 500.0));
    assert_eq!(q.sweep_order.unwrap().whole.speed, 15.0);
    assert_eq!(
        q.bandwidth, 100e6,
        "the lanes are the executor's to foresee"
    );

    let ahead = Packed {
        speed: 0.5,
        bandwidth: 150e6,
    };
    let half = overcommit::foreseen(&p, ahead, 0.5);
    assert_eq!(half.writes.unwrap().drift, N as f64 / 2.0 * 0.75);
    assert!((half.bandwidth - 120e6).abs() < 1.0, "{}", half.bandwidth);
    let at_mark = overcommit::foreseen(&p, ahead, 0.0);
    assert_eq!(at_mark.bandwidth, 150e6);
    let unknown = Packed {
        bandwidth: 0.0,
        ..ahead
    };
    assert_eq!(overcommit::foreseen(&p, unknown, 0.0).bandwidth, 100e6);
}

/// Packing 4 busy vCPUs onto 1 core lowers their dirty rate: precopy resends less.
#[test]
fn overcommit_lowers_the_dirty_rate_in_the_simulator() {
    let sim = SimConfig {
        vcpus: 4,
        ..sim_cfg(DirtyModel::Uniform {
            rate: 3000.0,
            working_set: N,
        })
    };
    let plain = policy_cfg();
    let packed = PolicyConfig {
        overcommit: Some(onto_one_core(0.0)),
        ..plain.clone()
    };
    let (a, _) = run(PolicyKind::Timebound, &plain, sim.clone());
    let (b, _) = run(PolicyKind::Timebound, &packed, sim);
    assert_eq!(b.min_cores, Some(1));
    assert_eq!(b.end_controls.cores, None);
    assert!(b.pages_sent < a.pages_sent, "{b:?} vs {a:?}");
    assert!(b.downtime < a.downtime, "{b:?} vs {a:?}");
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
    // Mplm promises what membound promises; timebound 2.25 N; autoconverge what precopy does.
    for n in [1, 300, pages] {
        assert_eq!(
            bound_pages(PolicyKind::Mplm, n, &cfg),
            bound_pages(PolicyKind::Membound, n, &cfg)
        );
        assert_eq!(
            bound_pages(PolicyKind::Autoconverge, n, &cfg),
            bound_pages(PolicyKind::Precopy, n, &cfg)
        );
    }
    assert_eq!(
        bound_pages(PolicyKind::Timebound, 400, &cfg),
        Some(400 + 100 + 400)
    );
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
    for kind in PolicyKind::ALL {
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
    let mut m = Mplm::new(PolicyConfig {
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
    for kind in PolicyKind::ALL {
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
            assert!(last.fraction_done > 0.6, "{kind}: {last:?}");
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
        kind in 0..PolicyKind::ALL.len(),
        vcpus in 1u32..4,
        overcommit in proptest::option::of((1usize..4, 0.0..1.0f64, any::<bool>())),
    ) {
        let kind = PolicyKind::ALL[kind];
        let cfg = tight(&PolicyConfig {
            epoch: Duration::from_millis(epoch_ms),
            cycle_pages: cycle,
            dirty_share: share,
            timebound_dirty_share: share,
            max_epochs: 8,
            overcommit: overcommit.map(|(cores, at, stepwise)| Overcommit {
                cores,
                at,
                stepwise,
                from: 4,
            }),
            ..PolicyConfig::default()
        });
        let sim = SimConfig {
            pages: 1024,
            vcpus,
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
        match kind {
            PolicyKind::Mplm | PolicyKind::Timebound => prop_assert!(
                log.iter().all(|(p, d)| (*d == Decision::Switchover) == (p.never_sent == 0))
            ),
            _ => prop_assert!(
                log.iter().all(|(p, d)| *d != Decision::Switchover || p.never_sent == 0)
            ),
        }
        // Whatever was throttled or over-committed is undone at the switchover.
        prop_assert_eq!(out.end_controls.cores, None);
    }
}

/// Two sweeps, one a vCPU over the first quarter of its half of memory (the testbed's `seq`
/// 128M: a third of the link's rate together, memory sent once in 2.4 s, timebound
/// harvesting every second), from eight starting points; the forecasts followed in the log
/// (`followed`) or from the mean model.
fn two_sweeps_errors(
    kind: PolicyKind,
    warmup: Duration,
    last_faster: f64,
    followed: bool,
) -> Vec<f64> {
    errors_from_eight_starts(kind, &two_sweeps_cfg(), followed, |start| {
        two_sweeps(start, warmup, last_faster)
    })
}

/// The policies' configuration for [`two_sweeps`]: timebound harvesting every second.
fn two_sweeps_cfg() -> PolicyConfig {
    PolicyConfig {
        timebound_epoch: Duration::from_secs(1),
        ..PolicyConfig::default()
    }
}

/// The guest of [`two_sweeps_errors`], its sweeps `start` pages in.
fn two_sweeps(start: u64, warmup: Duration, last_faster: f64) -> SimConfig {
    let memory_secs = 2.4;
    SimConfig {
        writes: Some(sweep_probe(0.3)),
        read_log: true,
        vcpus: 2,
        sweep_start: start,
        warmup,
        warmup_speed: 2.0,
        bandwidth: (N * 4096) as f64 / memory_secs,
        ..sim_cfg(DirtyModel::SequentialEach {
            rate: 0.3 * N as f64,
            working_set: N / 4,
            last_faster,
        })
    }
}

/// Timebound over [`two_sweeps`] (the testbed's `seq` 128M; each sweep's period 1.7 s, the
/// epoch 1 s), from eight starting points: the stop-and-copy forecast at 25% and 50%
/// against the pages it sent. The dirty sender resends the pages the harvests found, the
/// oldest first, which are the sweeps' next ones: most of them are written again before the
/// next harvest. Each resend counted off the pages dirty at the last harvest, the forecast
/// came out short from every start, by 11% on average (up to 24%); followed in turn
/// ([`SweepEnd::resent_in_turn`]), off by 4% on average either way (at most 9%).
#[test]
fn timebound_forecasts_the_sweeps_writing_again_what_it_resent() {
    let (kind, cfg) = (PolicyKind::Timebound, two_sweeps_cfg());
    let mut errors = Vec::new();
    for k in 0..8 {
        let sim = two_sweeps(k * N / 8 + 100, Duration::from_secs(1), 1.0);
        let (out, _) = run(kind, &cfg, sim.clone());
        let actual = out.final_pages as f64;
        at_marks(kind, &cfg, sim, Progress::clone, |_, p, f, _| {
            let pages = f.downtime.as_secs_f64() / page_time(p).unwrap();
            errors.push(pages / actual - 1.0);
        });
    }
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(
        mean_abs(&errors) <= 0.06 && mean.abs() <= 0.03,
        "{errors:?} (mean {mean:.3})"
    );
}

/// Two sweeps, each in its own quarter of memory (the testbed's `seq` 128M), are followed
/// once they have come round (a second of the probe's warmup), each in its own share's order
/// ([`SweepOrder::parts`]): the time left at 25% and 50% off by 4.9% on average for timebound
/// (8.9% from the mean model) and 1.0% for mplm and membound (3.2–3.4%); with one vCPU 1.2 ×
/// as fast as the other, by 4.2% and 2.1–2.4% (the mean model 9.3% and 4.4–4.6%); at 1.5 ×,
/// 7.7% and 6.3–6.7% (7.9% and 5.4–5.7%). Followed in one order, two sweeps at different
/// speeds stood at two places in it, the densest run of a read one or the other: 7.8% and
/// 4.5% at 1.2 ×, 10.2% and 6.8–7.1% at 1.5 ×. Before they have come round (0.3 s of
/// warmup), 6–10% at 1.2 × (12–16% in one order; the mean model 4–9%). Before they have come round, the forecast takes them for a sweep over
/// all of memory, whose writes land on pages not written yet this lap: it is short, by 12%
/// (timebound) and 6% on average after 0.3 s of warmup, 18–23% after none, where the mean
/// model is off by 3–10%. The log cannot tell the two apart before a sweep comes round: the
/// testbed's `dirty-all` is two sweeps too, each over its half of memory, and there following
/// it from the first lap is what holds (`a_sweep_about_to_cover_memory_is_followed`).
#[test]
fn two_sweeps_are_followed_once_they_have_come_round() {
    for kind in [
        PolicyKind::Timebound,
        PolicyKind::Mplm,
        PolicyKind::Membound,
    ] {
        for (last_faster, within) in [(1.0, 0.06), (1.2, 0.06), (1.5, 0.08)] {
            let errors = two_sweeps_errors(kind, Duration::from_secs(1), last_faster, true);
            let e = mean_abs(&errors);
            assert!(e <= within, "{kind} at {last_faster}: {errors:?} ({e:.3})");
        }
    }
}

/// The testbed's `dirty-all`: two sweeps, each over its vCPU's half of memory, one 1.5 × as
/// fast as the other, after the probe's 0.3 s. Each followed in its share's order, the time
/// left at 25% and 50% is off by 3.0–5.2% on average (timebound, mplm; 12–15% in one order
/// at 1.2 ×); the mean model by 20–23%. Membound, which sends what they write ahead of the
/// never-sent pages once, in its tail: 1.3% followed, 2.5% from the mean model.
#[test]
fn two_sweeps_over_their_halves_are_followed_apart() {
    for kind in [
        PolicyKind::Timebound,
        PolicyKind::Mplm,
        PolicyKind::Membound,
    ] {
        let errors = |followed| {
            let cfg = PolicyConfig {
                timebound_epoch: Duration::from_secs(1),
                ..PolicyConfig::default()
            };
            errors_from_eight_starts(kind, &cfg, followed, |start| SimConfig {
                writes: Some(sweep_probe(0.3)),
                read_log: true,
                vcpus: 2,
                sweep_start: start,
                warmup: Duration::from_millis(300),
                warmup_speed: 2.0,
                bandwidth: (N * 4096) as f64 / 2.4,
                ..sim_cfg(DirtyModel::SequentialEach {
                    rate: 0.6 * N as f64,
                    working_set: N / 2,
                    last_faster: 1.5,
                })
            })
        };
        let (followed, mean) = (errors(true), errors(false));
        let (f, m) = (mean_abs(&followed), mean_abs(&mean));
        // Membound holds back what the sweeps write ahead of the never-sent pages and sends it
        // once, in the tail: there the mean model holds too.
        let mean_holds = kind == PolicyKind::Membound && m <= 0.05;
        assert!(
            f <= 0.08 && (2.0 * f <= m || mean_holds),
            "{kind}: followed {followed:?} ({f:.3}), mean model {m:.3}"
        );
    }
}

/// An over-commit due at 50% (4 vCPUs onto 1 core): until the mark, the forecasts take the
/// guest at its speed now before it and at a quarter of it after. Taken at its speed now
/// throughout, the ETA came out 8–47% long at 25% and 8–58% at 50% (the forecast there is made
/// just before the over-commit begins). Membound, whose forecasts come out 4–19% short on
/// these guests without any over-commit in this simulator, is left out.
#[test]
fn an_over_commit_due_later_is_foreseen() {
    let cfg = PolicyConfig {
        overcommit: Some(onto_one_core(0.5)),
        ..policy_cfg()
    };
    let (mut seen, mut blind) = (Vec::new(), Vec::new());
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        for (rate, ws) in [(2000.0, N / 2), (3000.0, N), (6000.0, N)] {
            let sim = SimConfig {
                vcpus: 4,
                read_log: true,
                overcommit: cfg.overcommit,
                ..random_writes(rate, ws, 1.0)
            };
            let s = eta_errors(kind, &cfg, sim.clone());
            let b = eta_errors_as(kind, &cfg, sim, |p| Progress {
                overcommit_ahead: None,
                ..p.clone()
            });
            assert!(
                s[0].abs() < b[0] && s[1].abs() < b[1],
                "{kind} {rate}/{ws}: {s:?} against {b:?}"
            );
            seen.extend(s);
            blind.extend(b);
        }
    }
    assert!(mean_abs(&seen) <= 0.1, "{seen:?}");
    assert!(mean_abs(&blind) >= 0.2, "{blind:?}");
}

/// The forecast's range at the 25% and 50% marks ([`at_marks`]): the least and most time
/// left, the time that was actually left, and the forecast's own.
fn ranges(kind: PolicyKind, cfg: &PolicyConfig, sim: SimConfig) -> Vec<(f64, f64, f64, f64)> {
    let mut seen = Vec::new();
    at_marks(kind, cfg, sim, Progress::clone, |policy, p, f, left| {
        let (least, most) = forecast_range(policy, p, f).expect("a known forecast");
        seen.push((
            least.as_secs_f64(),
            most.as_secs_f64(),
            left,
            f.remaining.as_secs_f64(),
        ));
    });
    seen
}

/// A guest writing `rate` pages/s over `working_set` pages at `speed` × the write model the
/// probe gave (the log read between harvests).
fn off_its_model(rate: f64, working_set: u64, speed: f64) -> SimConfig {
    SimConfig {
        vcpus: 4,
        read_log: true,
        ..random_writes(rate * speed, working_set, 1.0 / speed)
    }
}

/// The range brackets what the forecast says for any guest speed within [`SPEED_SPREAD`] of
/// the one measured and any lanes' rate within [`BANDWIDTH_SPREAD`]: every policy, at 25% and
/// 50% over guests slower and faster than the link. (How often it holds the time that was
/// actually left is measured on the testbed: `benches/src/bin/matrix.rs`.)
#[test]
fn the_forecast_range_brackets_the_speeds_within_its_spread() {
    let cfg = policy_cfg();
    for kind in PolicyKind::ALL {
        for (rate, ws) in [(2000.0, N / 2), (3000.0, N), (6000.0, N)] {
            let sim = off_its_model(rate, ws, 1.0);
            at_marks(kind, &cfg, sim, Progress::clone, |policy, p, f, _| {
                let (least, most) = forecast_range(policy, p, f).expect("known");
                for speed in [0.8, 0.9, 1.1, 1.2] {
                    for bandwidth in [0.95, 1.05] {
                        let left = policy.forecast(&p.at_rates(speed, bandwidth)).remaining;
                        assert!(
                            least <= left && left <= most,
                            "{kind} {rate}/{ws}, guest {speed}, lanes {bandwidth}: \
                             {left:?} outside {least:?}..{most:?}"
                        );
                    }
                }
            });
        }
    }
}

/// Near its threshold, precopy's time left hangs on the guest's speed (the passes left are
/// ln(pages that fit ÷ dirty pages) ÷ ln of the share a pass leaves dirty), and its range is
/// wide: at 50%, over 3 times as wide as timebound's and mplm's over the same guest, and as
/// its own over a guest that converges in a pass or two.
#[test]
fn the_forecast_range_is_wide_where_precopy_nears_its_threshold() {
    let cfg = policy_cfg();
    let width = |kind, rate, ws| {
        let (least, most, left, _) = ranges(kind, &cfg, off_its_model(rate, ws, 1.0))[1];
        (most - least) / left
    };
    let near = width(PolicyKind::Precopy, 6000.0, N);
    let easy = width(PolicyKind::Precopy, 2000.0, N / 2);
    assert!(near > 3.0 * easy, "{near} vs {easy}");
    for kind in [PolicyKind::Timebound, PolicyKind::Mplm] {
        let bounded = width(kind, 6000.0, N);
        assert!(near > 3.0 * bounded, "precopy {near} vs {kind} {bounded}");
    }
}

/// A policy's snapshot forecasts as the policy did when it was taken, whatever the policy
/// decides after: the report's hindsight asks it at the end of the live phase. Over-commit's
/// wrapper too.
#[test]
fn a_snapshot_forecasts_as_the_policy_did_when_it_was_taken() {
    let plain = policy_cfg();
    let overcommitted = PolicyConfig {
        overcommit: Some(onto_one_core(0.9)),
        ..policy_cfg()
    };
    let mut moved = 0;
    for cfg in [&plain, &overcommitted] {
        for kind in PolicyKind::ALL {
            let (_, log) = run(kind, cfg, off_its_model(3000.0, N, 1.0));
            let mut policy = make_policy(kind, cfg);
            let half = log.len() / 2;
            for (p, d) in &log[..half] {
                assert_eq!(&policy.decide(p), d);
            }
            let p = &log[half].0;
            let then = policy.forecast(p);
            let snapshot = policy.snapshot();
            for (p, d) in &log[half..] {
                assert_eq!(&policy.decide(p), d);
            }
            moved += usize::from(policy.forecast(p) != then);
            assert_eq!(snapshot.forecast(p), then, "{kind}");
        }
    }
    // Not vacuous: the policies' own forecasts from that progress changed as they went on.
    assert!(moved >= PolicyKind::ALL.len(), "{moved}");
}

/// A forecast from progress whose rates were mismeasured (the guest taken 20% slower and the
/// lanes 15% faster than they ran) misses; from the same progress as it went, with the rates
/// that came ([`Progress::as_it_went`]), it is the forecast from the true rates.
#[test]
fn a_forecast_with_the_rates_that_came_is_the_one_from_the_true_rates() {
    let cfg = policy_cfg();
    for kind in PolicyKind::ALL {
        let sim = off_its_model(3000.0, N, 1.0);
        at_marks(kind, &cfg, sim, Progress::clone, |policy, p, f, _| {
            let seen = Progress {
                bandwidth: 1.15 * p.bandwidth,
                ..p.at_speed(0.8)
            };
            let left = |q: &Progress| policy.forecast(q).remaining.as_secs_f64();
            let truth = f.remaining.as_secs_f64();
            let missed = left(&seen);
            let hindsight = left(&seen.as_it_went(1.25, p.bandwidth, p.bytes_per_page));
            assert!(
                (missed - truth).abs() > 0.05 * truth,
                "{kind}: {missed} vs {truth}"
            );
            assert!(
                (hindsight - truth).abs() < 1e-3 * truth,
                "{kind}: {hindsight} vs {truth}"
            );
        });
    }
}
