//! Classic iterative pre-copy, the baseline.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Pass0
//!     Pass0: first pass, every page once
//!     Pass0 --> Pass0: Send{cycle, 0}
//!     Pass0 --> Check: never_sent == 0 → Harvest
//!     Check: after a harvest
//!     Check --> [*]: dirty × bytes/page ÷ bandwidth ≤ max_downtime → Switchover
//!     Check --> [*]: epoch ≥ max_epochs → Switchover / Abort (on_limit)
//!     Check --> DirtyPass
//!     DirtyPass: resend the pages dirty at the harvest
//!     DirtyPass --> DirtyPass: Send{0, cycle}
//!     DirtyPass --> Check: pass done → Harvest
//!     Pass0 --> [*]: timeout → Abort (on_limit = abort)
//!     DirtyPass --> [*]: timeout → Switchover / Abort (on_limit)
//! ```

use std::time::Duration;

use super::EpochTracker;
use super::{dirty_pass, expected_writes, forecast_from, forecast_with_pass, page_time};
use super::{rethrottled_page_time, secs_to_duration, sweep};
use super::{Decision, Forecast, PolicyConfig, Progress, Writes};
use super::{OnLimit, Policy};

/// The guest's writing speed against the write model, as fitted under a throttle.
#[derive(Debug, Clone, Copy)]
struct SpeedFit {
    throttle: f64,
    /// The speed's logarithm.
    ln_speed: f64,
}

/// `ln(1 − throttle)`, the throttle kept below 1.
fn ln_free(throttle: f64) -> f64 {
    (1.0 - throttle.clamp(0.0, crate::vm::MAX_THROTTLE)).ln()
}

/// The least a dirty pass of `pass` pages over `secs` seconds leaves dirty when the guest
/// sweeps memory ([`sweep`]), writing at `speed` × the write model's drift. From where the
/// sweep stands, the pages ahead of it were written a lap ago and sent since: not in the
/// pass, which resends those behind it (written since the harvest), and each is dirty at the
/// pass's end once written. Past them the sweep comes round onto the pass's pages, the oldest
/// first; a page it writes at `w` seconds is dirty at the end if the pass resent it before,
/// which at an even pace in an order of its own is `w / secs` likely. The mean model spreads
/// every write over the pages the sweep covers, pass and all: on a `dirty-all` guest half
/// dirty at each harvest, an autoconverge pass of 1.1 s left 64k pages dirty where it
/// forecast 51k, and the forecast at 25% was 26–45% short; a throttled pass over 62% of
/// memory left 66k, of which the pages ahead of the sweep were 50k.
fn swept_ahead(p: &Progress, pass: f64, secs: f64, speed: f64) -> f64 {
    let (Some(m), Some((_, shapes))) = (p.writes.as_ref(), sweep(p)) else {
        return 0.0;
    };
    let rate = m.drift * speed;
    if rate <= 0.0 || secs <= 0.0 {
        return 0.0;
    }
    // Before it has come round, a sweep is taken over all of memory (or its shares); the
    // pages the log has shown written say what it covers.
    let covered = shapes
        .iter()
        .map(|&(_, pages)| pages)
        .sum::<f64>()
        .min(m.ceiling(secs));
    let ahead = (covered - pass).max(0.0);
    // When the sweep reaches the pass's pages, and when it has covered its pages once.
    let (reach, lap) = (ahead / rate, covered / rate);
    let end = secs.min(lap);
    if end <= reach {
        return rate * end;
    }
    ahead + rate * (end * end - reach * reach) / (2.0 * secs)
}

/// Classic pre-copy: a first pass over all memory, then passes over the dirty set until the
/// estimated downtime fits `max_downtime`, or `max_epochs` / `timeout` apply `on_limit`.
#[derive(Debug, Clone)]
pub struct Precopy {
    cfg: PolicyConfig,
    /// Epoch whose harvest has been evaluated.
    evaluated: u32,
    /// Pages of the current dirty pass not asked for yet.
    pass_left: u64,
    /// Pages of the current dirty pass.
    pass: u64,
    /// When the current dirty pass's harvest was taken, in seconds from the start.
    pass_at: f64,
    /// The throttle the current dirty pass runs under.
    pass_throttle: f64,
    /// How fast the guest writes against the write model, fitted to the dirty passes'
    /// harvests (`None` until one is seen).
    fit: Option<SpeedFit>,
    /// How the guest's speed follows the throttle: as `(1 − throttle)^response`; `None` (1)
    /// until two fits under different throttles measure it.
    response: Option<f64>,
    limit: bool,
    /// The last decision was Switchover: what is dirty now is the stop-and-copy.
    switching: bool,
    track: EpochTracker,
}

impl Precopy {
    /// A fresh policy with this configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            cfg,
            evaluated: 0,
            pass_left: 0,
            pass: 0,
            pass_at: 0.0,
            pass_throttle: 0.0,
            fit: None,
            response: None,
            limit: false,
            switching: false,
            track: EpochTracker::default(),
        }
    }

    /// Estimated downtime if the `dirty` pages were sent in the stop-and-copy; `None` if the
    /// bandwidth is unknown and there is something to send.
    fn downtime_of(p: &Progress, dirty: u64) -> Option<Duration> {
        if dirty == 0 {
            return Some(Duration::ZERO);
        }
        page_time(p).map(|t| secs_to_duration(dirty as f64 * t))
    }

    fn on_limit(&mut self, why: String) -> Decision {
        self.limit = true;
        match self.cfg.on_limit {
            OnLimit::Switchover => Decision::Switchover,
            OnLimit::Abort => Decision::Abort(why),
        }
    }

    /// Pages dirty at the end of a dirty pass that resends `pass` pages at an even pace over
    /// `secs` seconds, the guest writing at `speed` × the write model: a write counts on them
    /// only after their resend, on the other pages whenever it falls in the window.
    fn after_pass(&self, p: &Progress, pass: f64, secs: f64, speed: f64) -> f64 {
        self.pass_writes(p, pass, pass, secs, speed)
            .total()
            .max(swept_ahead(p, pass, secs, speed))
            .min(p.total_pages as f64)
    }

    /// The writes [`Precopy::after_pass`] counts, when `resends` of the `pass` pages are dirty
    /// pages (the others never-sent ones).
    fn pass_writes(&self, p: &Progress, pass: f64, resends: f64, secs: f64, speed: f64) -> Writes {
        let (resending, throttle) = Self::writing_at(
            Progress {
                never_sent: pass as u64,
                ..p.clone()
            },
            speed,
        );
        // The resends are the working set's pages rewritten since the last harvest, or all of
        // them.
        let ws = p.working_set();
        let resent = if ws > 0.0 {
            (resends / ws).min(1.0)
        } else {
            0.0
        };
        expected_writes(&resending, &self.track, secs, secs, false, throttle, resent)
    }

    /// `p` with the guest writing at `speed` × the write model, and the throttle that gives
    /// the same without one (the last epochs' dirty rate then scales by `1 − throttle`).
    fn writing_at(mut p: Progress, speed: f64) -> (Progress, f64) {
        match p.writes.as_mut() {
            Some(m) => {
                *m = m.scaled(speed);
                (p, 0.0)
            }
            None => (p, (1.0 - speed).clamp(0.0, 1.0)),
        }
    }

    /// How fast the guest writes under `throttle` against the write model: `1 − throttle`
    /// until a dirty pass was fitted; then the fitted speed, moved to `throttle` by the
    /// measured response.
    fn speed_under(&self, throttle: f64) -> f64 {
        match self.fit {
            None => ln_free(throttle).exp(),
            Some(f) => {
                let response = self.response.unwrap_or(1.0);
                (f.ln_speed + response * (ln_free(throttle) - ln_free(f.throttle))).exp()
            }
        }
    }

    /// Model: the first pass sends the never-sent pages; then each dirty pass of `D` pages takes
    /// `D × page time`, during which the guest dirties the next pass, until the pass fits
    /// `max_downtime` or `max_epochs` harvests are done (or the timeout). The guest runs under
    /// `throttle` until the next harvest; after each harvest, `step(dirtied, sent)` (the pages
    /// the epoch dirtied and those it sent) gives the throttle for the next pass. A throttle
    /// slows the guest's writes and gives the workers back the share of the cores it takes.
    pub(super) fn forecast_stepped(
        &self,
        p: &Progress,
        throttle: f64,
        mut step: impl FnMut(f64, f64) -> f64,
    ) -> Forecast {
        let total = p.total_pages as f64;
        if self.switching {
            // The dirty set, and what was written since its harvest.
            let (q, th) = Self::writing_at(p.clone(), self.speed_under(throttle));
            let since = expected_writes(&q, &self.track, 0.0, 0.0, true, th, 0.0).total();
            return forecast_from(p, 0.0, (p.dirty as f64 + since).min(total));
        }
        let measured = page_time(p).unwrap_or(0.0);
        let page_time_at = |th: f64| rethrottled_page_time(p, measured, throttle, th);
        let t = page_time_at(throttle);
        let max_down = self.cfg.max_downtime.as_secs_f64();
        let mut live = p.never_sent as f64;
        let mut ahead = live * t;
        // The dirty passes after the current one: pages and seconds.
        let (mut passes, mut pass_secs) = (0.0, 0.0);
        let mut epoch = p.epoch;
        let mut throttle = throttle;
        // Dirty pages the next check sees: those of the harvest just done, or those the rest of
        // the current pass (the first one, or a dirty pass) leaves for the harvest at its end.
        let first_pass = p.never_sent > 0 || epoch == 0;
        let left = if first_pass {
            Some(0.0)
        } else if p.epoch == self.evaluated {
            Some(self.pass_left.min(p.dirty) as f64)
        } else {
            None
        };
        let mut dirty = match left {
            None => p.dirty as f64,
            Some(left) => {
                live += left;
                ahead += left * t;
                epoch += 1;
                let speed = self.speed_under(throttle);
                // From the harvest that began the current pass to its end.
                let window = p.since_harvest.as_secs_f64() + ahead;
                let dirtied = match p.unharvested {
                    // What the log has shown written since the pass began, with the writes
                    // to come on the pages sent and those the pass still sends; in a dirty
                    // pass, at least the sweep's writes over it.
                    Some(seen) => {
                        let swept = if first_pass {
                            0.0
                        } else {
                            swept_ahead(p, self.pass as f64, window, speed)
                        };
                        self.pass_writes(p, p.never_sent as f64 + left, left, ahead, speed)
                            .with_seen(seen as f64, p.working_set(), total)
                            .max(swept)
                            .min(total)
                    }
                    None => {
                        let pass = if p.epoch == 0 {
                            total
                        } else {
                            self.pass as f64
                        };
                        self.after_pass(p, pass, window, speed)
                    }
                };
                throttle = step(dirtied, p.never_sent as f64 + left);
                dirtied
            }
        };
        let deadline = self.cfg.timeout.map(|d| d.as_secs_f64());
        loop {
            let t = page_time_at(throttle);
            let fits = dirty * t <= max_down || dirty == 0.0;
            let elapsed = p.elapsed.as_secs_f64() + ahead;
            let limited = epoch >= self.cfg.max_epochs || deadline.is_some_and(|d| elapsed > d);
            if fits || limited || t == 0.0 {
                break;
            }
            let pass = dirty;
            passes += pass;
            pass_secs += pass * t;
            ahead += pass * t;
            dirty = self.after_pass(p, pass, pass * t, self.speed_under(throttle));
            throttle = step(dirty, pass);
            epoch += 1;
        }
        let pass_time = if passes > 0.0 { pass_secs / passes } else { t };
        forecast_with_pass(p, live, (passes, pass_time), dirty)
    }
}

impl Policy for Precopy {
    fn name(&self) -> &'static str {
        "precopy"
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        self.decide_throttled(p, 0.0)
    }

    fn forecast(&self, p: &Progress) -> Forecast {
        self.forecast_stepped(p, 0.0, |_, _| 0.0)
    }

    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(self.clone())
    }

    fn limit_reached(&self) -> bool {
        self.limit
    }
}

impl Precopy {
    /// [`Policy::decide`], with the guest under `throttle` from now on.
    pub(super) fn decide_throttled(&mut self, p: &Progress, throttle: f64) -> Decision {
        let d = self.next(p, throttle);
        self.switching = d == Decision::Switchover;
        d
    }

    /// After a dirty pass's harvest: the speed at which the write model gives the pages the
    /// pass left dirty (1/50 to 5 × the model). The first fit is taken as it is; each later
    /// one is averaged (in logarithms) with the last, moved to its throttle by the response,
    /// and a fit under another throttle than the last measures that response (0 to 1; the
    /// first as it is, then averaged too). Not the first pass: it sends in address order, and
    /// where the working set lies decides how long its pages stay exposed after their send.
    fn fit_speed(&mut self, p: &Progress) {
        if p.writes.is_none() {
            return;
        }
        let secs = p.harvested_at() - self.pass_at;
        let pass = self.pass as f64;
        if p.epoch < 2 || pass == 0.0 || secs <= 0.0 {
            return;
        }
        let seen = p.dirty as f64;
        let (mut lo, mut hi) = (0.02f64.ln(), 5.0f64.ln());
        for _ in 0..30 {
            let mid = (lo + hi) / 2.0;
            if self.after_pass(p, pass, secs, mid.exp()) < seen {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (ln_speed, throttle) = ((lo + hi) / 2.0, self.pass_throttle);
        let ln_speed = match self.fit {
            None => ln_speed,
            Some(last) => {
                let span = ln_free(throttle) - ln_free(last.throttle);
                if span.abs() >= 0.05 {
                    let seen = ((ln_speed - last.ln_speed) / span).clamp(0.0, 1.0);
                    self.response = Some(self.response.map_or(seen, |r| (r + seen) / 2.0));
                }
                (last.ln_speed + self.response.unwrap_or(1.0) * span + ln_speed) / 2.0
            }
        };
        self.fit = Some(SpeedFit { throttle, ln_speed });
    }

    fn next(&mut self, p: &Progress, throttle: f64) -> Decision {
        self.track.observe(p);
        let timed_out = self.cfg.timed_out(p);
        if timed_out && self.cfg.on_limit == OnLimit::Abort {
            return self.on_limit(format!(
                "precopy: timeout {:?} reached at epoch {} with {} pages never sent and {} dirty",
                self.cfg.timeout.unwrap_or_default(),
                p.epoch,
                p.never_sent,
                p.dirty
            ));
        }
        if p.never_sent > 0 {
            return Decision::Send {
                never_sent: p.never_sent.min(self.cfg.cycle()),
                dirty: 0,
            };
        }
        if timed_out {
            return self.on_limit(String::new());
        }
        if p.epoch == 0 {
            return Decision::Harvest;
        }
        if p.epoch != self.evaluated {
            self.evaluated = p.epoch;
            self.fit_speed(p);
            let estimate = Self::downtime_of(p, p.dirty);
            if estimate.is_some_and(|d| d <= self.cfg.max_downtime) {
                return Decision::Switchover;
            }
            if p.epoch >= self.cfg.max_epochs {
                let estimate = estimate.map_or_else(|| "unknown".to_owned(), |d| format!("{d:?}"));
                return self.on_limit(format!(
                    "precopy did not converge in {} epochs: {} dirty pages would take {} \
                     (max downtime {:?})",
                    p.epoch, p.dirty, estimate, self.cfg.max_downtime
                ));
            }
            self.pass_left = p.dirty;
            self.pass = p.dirty;
            self.pass_at = p.harvested_at();
            self.pass_throttle = throttle;
        }
        dirty_pass(&mut self.pass_left, p.dirty, self.cfg.cycle())
    }
}
