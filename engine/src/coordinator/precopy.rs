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
use super::{dirty_pass, expected_writes, forecast_from, page_time, secs_to_duration};
use super::{Decision, Forecast, PolicyConfig, Progress};
use super::{OnLimit, Policy};

/// Classic pre-copy: a first pass over all memory, then passes over the dirty set until the
/// estimated downtime fits `max_downtime`, or `max_epochs` / `timeout` apply `on_limit`.
#[derive(Debug, Clone)]
pub struct Precopy {
    cfg: PolicyConfig,
    /// Epoch whose harvest has been evaluated.
    evaluated: u32,
    /// Pages of the current dirty pass not asked for yet.
    pass_left: u64,
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

    /// Model: the first pass sends the never-sent pages; then each dirty pass of `D` pages takes
    /// `D × page time`, during which the last epoch's dirty rate dirties the next pass, until
    /// the pass fits `max_downtime` or `max_epochs` harvests are done (or the timeout). The guest runs under `throttle`.
    pub(super) fn forecast_throttled(&self, p: &Progress, throttle: f64) -> Forecast {
        let total = p.total_pages as f64;
        if self.switching {
            // The dirty set, and what was written since its harvest.
            let since = expected_writes(p, &self.track, 0.0, 0.0, true, throttle).total();
            return forecast_from(p, 0.0, (p.dirty as f64 + since).min(total));
        }
        let t = page_time(p).unwrap_or(0.0);
        let max_down = self.cfg.max_downtime.as_secs_f64();
        let mut live = p.never_sent as f64;
        let mut elapsed = p.elapsed.as_secs_f64() + live * t;
        let mut epoch = p.epoch;
        // Dirty pages the next check sees: those of the harvest just done, or those the rest of
        // the current pass (the first one, or a dirty pass) leaves for the harvest at its end.
        let left = if p.never_sent > 0 || epoch == 0 {
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
                elapsed += left * t;
                epoch += 1;
                let ahead = (p.never_sent as f64 + left) * t;
                let sending = p.never_sent as f64 * t;
                expected_writes(p, &self.track, ahead, sending, true, throttle)
                    .total()
                    .min(total)
            }
        };
        let deadline = self.cfg.timeout.map(|d| d.as_secs_f64());
        loop {
            let fits = dirty * t <= max_down || dirty == 0.0;
            let limited = epoch >= self.cfg.max_epochs || deadline.is_some_and(|d| elapsed > d);
            if fits || limited || t == 0.0 {
                break;
            }
            live += dirty;
            elapsed += dirty * t;
            dirty = expected_writes(p, &self.track, dirty * t, 0.0, false, throttle)
                .total()
                .min(total);
            epoch += 1;
        }
        forecast_from(p, live, dirty)
    }
}

impl Policy for Precopy {
    fn name(&self) -> &'static str {
        "precopy"
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        let d = self.next(p);
        self.switching = d == Decision::Switchover;
        d
    }

    fn forecast(&self, p: &Progress) -> Forecast {
        self.forecast_throttled(p, 0.0)
    }

    fn limit_reached(&self) -> bool {
        self.limit
    }
}

impl Precopy {
    fn next(&mut self, p: &Progress) -> Decision {
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
        }
        dirty_pass(&mut self.pass_left, p.dirty, self.cfg.cycle())
    }
}
