//! CPU over-commit (TLM): past a progress mark, the vCPU threads are packed onto fewer cores,
//! which lowers the dirty rate and leaves cores to the migration workers. Wraps any policy.
//!
//! Once the wrapped policy's own progress fraction reaches `at` (looked at every
//! [`CHECK_EVERY`] of memory sent, not at every decision: a forecast can walk a page sample),
//! [`Controls::cores`] becomes `cores` (or, `stepwise`, one core fewer than `from` and then one
//! fewer at every harvest, down to `cores`). On `Switchover` or `Abort` it goes back to `None`:
//! the executor gives the vCPU threads their own affinity back (it also does so on any
//! rollback).
//!
//! Until the mark, the forecasts foresee it ([`Progress::overcommit_ahead`]): the guest's
//! speed and the lanes' rate as they are until then and as the executor expects them after,
//! weighed by the share of the pages left each covers. Before, they took both as they were:
//! on the testbed, with `--overcommit 1 --overcommit-at 0.5` (two vCPUs on one core of two),
//! the ETA at 50% missed by more than 10% in 19 of 28 rows, 18 of them long (11–29%).

use serde::{Deserialize, Serialize};

use super::{Controls, Decision, Forecast, Packed, Policy, Progress};

/// The share of memory sent between two looks at the progress mark.
const CHECK_EVERY: f64 = 0.01;

/// Over-commit settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Overcommit {
    /// Cores the vCPU threads are packed onto (at least 1).
    pub cores: usize,
    /// Progress fraction (0..=1) from which they are; 0 = from the start.
    pub at: f64,
    /// Remove one core at a time (at each harvest) instead of all at once.
    pub stepwise: bool,
    /// Cores the vCPU threads may use before over-commit (where a stepwise descent starts).
    pub from: usize,
}

impl Overcommit {
    /// The cores the vCPU threads get when over-commit begins: `cores`, or one fewer than
    /// `from` when `stepwise` (never fewer than `cores`, nor than 1).
    pub fn first_cores(&self) -> usize {
        let floor = self.cores.max(1);
        if self.stepwise {
            self.from.saturating_sub(1).max(floor)
        } else {
            floor
        }
    }
}

/// The share of their speed vCPUs that take `demand` cores' time can keep on `cores` cores
/// (`None`: the cores they have): at most those cores' time. 1 if `demand` is unknown (0).
pub fn cores_share(cores: Option<usize>, demand: f64) -> f64 {
    match cores {
        Some(c) if demand > 0.0 => (c.max(1) as f64 / demand).min(1.0),
        _ => 1.0,
    }
}

/// `p` with an over-commit `ahead` that begins once the share `before` of the pages left has
/// gone: the guest at its speed now for that share and at `ahead`'s after, taken as one
/// speed; each page at the lanes' rate now or `ahead`'s, its time averaged the same way.
pub(super) fn foreseen(p: &Progress, ahead: Packed, before: f64) -> Progress {
    let after = 1.0 - before;
    let bandwidth = if p.bandwidth > 0.0 && ahead.bandwidth > 0.0 {
        1.0 / (before / p.bandwidth + after / ahead.bandwidth)
    } else {
        p.bandwidth
    };
    Progress {
        bandwidth,
        ..p.at_speed(before + after * ahead.speed)
    }
}

/// A policy whose vCPUs are over-committed past a progress mark.
pub struct Overcommitted {
    inner: Box<dyn Policy>,
    cfg: Overcommit,
    cores: Option<usize>,
    seen_epoch: u32,
    /// Pages sent when the progress mark was last looked at (`None`: not yet).
    checked: Option<u64>,
}

impl Overcommitted {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Policy>, cfg: Overcommit) -> Self {
        Self {
            inner,
            cfg,
            cores: None,
            seen_epoch: 0,
            checked: None,
        }
    }

    fn update(&mut self, p: &Progress) {
        let floor = self.cfg.cores.max(1);
        match self.cores {
            None => {
                let step = ((p.total_pages as f64 * CHECK_EVERY) as u64).max(1);
                if self
                    .checked
                    .is_some_and(|at| p.pages_sent < at.saturating_add(step))
                {
                    return;
                }
                self.checked = Some(p.pages_sent);
                if self.inner.forecast(p).fraction_done >= self.cfg.at {
                    self.seen_epoch = p.epoch;
                    self.cores = Some(self.cfg.first_cores());
                }
            }
            Some(c) if self.cfg.stepwise && p.epoch != self.seen_epoch => {
                self.seen_epoch = p.epoch;
                self.cores = Some(c.saturating_sub(1).max(floor));
            }
            Some(_) => {}
        }
    }
}

impl Policy for Overcommitted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        let d = self.inner.decide(p);
        match d {
            Decision::Switchover | Decision::Abort(_) => self.cores = None,
            Decision::Send { .. } | Decision::Harvest => self.update(p),
        }
        d
    }

    fn forecast(&self, p: &Progress) -> Forecast {
        let Some(ahead) = p.overcommit_ahead.filter(|_| self.cores.is_none()) else {
            return self.inner.forecast(p);
        };
        // The share of the pages left that go before the mark.
        let done = self.inner.forecast(p).fraction_done;
        let before = if done < 1.0 {
            ((self.cfg.at - done) / (1.0 - done)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.inner.forecast(&foreseen(p, ahead, before))
    }

    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(Self {
            inner: self.inner.snapshot(),
            ..*self
        })
    }

    fn limit_reached(&self) -> bool {
        self.inner.limit_reached()
    }

    fn controls(&self) -> Controls {
        Controls {
            cores: self.cores,
            ..self.inner.controls()
        }
    }
}
