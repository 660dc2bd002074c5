//! Pre-copy with QEMU's auto-converge, the baseline that throttles instead of bounding.
//!
//! At every harvest the policy compares the pages the guest dirtied during the epoch that just
//! ended with the pages sent in it. When dirtied > `throttle_trigger` × sent (50%) for two
//! epochs in a row, the throttle steps: `throttle_initial` (20%) the first time, then
//! `+throttle_step` (10%) each time, at most `throttle_max` (99%). The counter restarts after a
//! step and whenever an epoch stays under the trigger. QEMU compares bytes; with pages of one
//! size, pages compare the same (and do not depend on compression).
//!
//! Everything else (passes, `max_downtime`, limits, forecast) is [`Precopy`]'s.

use super::{Controls, Decision, Forecast, Policy, PolicyConfig, Precopy, Progress};

/// Precopy plus a vCPU throttle stepped the way QEMU's auto-converge steps it.
#[derive(Debug, Clone)]
pub struct Autoconverge {
    precopy: Precopy,
    cfg: PolicyConfig,
    steps: Steps,
    seen_epoch: u32,
    pages_at_harvest: u64,
}

/// The throttle and the epochs above the trigger since its last step.
#[derive(Debug, Clone, Copy, Default)]
struct Steps {
    throttle: f64,
    /// Consecutive epochs above the trigger since the last step.
    high: u32,
}

impl Steps {
    /// After a harvest whose epoch dirtied `dirtied` pages and sent `sent`.
    fn after_epoch(&mut self, cfg: &PolicyConfig, dirtied: f64, sent: f64) {
        if dirtied > cfg.throttle_trigger * sent {
            self.high += 1;
        } else {
            self.high = 0;
        }
        if self.high >= 2 {
            self.high = 0;
            let max = cfg.throttle_max.clamp(0.0, crate::vm::MAX_THROTTLE);
            self.throttle = if self.throttle == 0.0 {
                cfg.throttle_initial
            } else {
                self.throttle + cfg.throttle_step
            }
            .min(max);
        }
    }
}

impl Autoconverge {
    /// A fresh policy with this configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            precopy: Precopy::new(cfg.clone()),
            cfg,
            steps: Steps::default(),
            seen_epoch: 0,
            pages_at_harvest: 0,
        }
    }

    /// The throttle in force.
    pub fn throttle(&self) -> f64 {
        self.steps.throttle
    }

    /// The throttle's state, and the pages sent at the last harvest, once `p` is seen.
    fn observed(&self, p: &Progress) -> (Steps, u64) {
        let mut steps = self.steps;
        if p.epoch == self.seen_epoch {
            return (steps, self.pages_at_harvest);
        }
        let sent = p.pages_sent.saturating_sub(self.pages_at_harvest);
        steps.after_epoch(&self.cfg, p.dirtied_last_epoch as f64, sent as f64);
        (steps, p.pages_sent)
    }

    fn observe(&mut self, p: &Progress) {
        (self.steps, self.pages_at_harvest) = self.observed(p);
        self.seen_epoch = p.epoch;
    }
}

impl Policy for Autoconverge {
    fn name(&self) -> &'static str {
        "autoconverge"
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        self.observe(p);
        self.precopy.decide_throttled(p, self.steps.throttle)
    }

    /// Precopy's forecast, with the throttle stepped by the same rule at every harvest it
    /// looks ahead to (the first counts the pages this epoch has sent so far).
    fn forecast(&self, p: &Progress) -> Forecast {
        let (mut steps, pages_at_harvest) = self.observed(p);
        let mut sent_before = p.pages_sent.saturating_sub(pages_at_harvest) as f64;
        self.precopy
            .forecast_stepped(p, steps.throttle, |dirtied, sent| {
                steps.after_epoch(&self.cfg, dirtied, sent + std::mem::take(&mut sent_before));
                steps.throttle
            })
    }

    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(self.clone())
    }

    fn limit_reached(&self) -> bool {
        self.precopy.limit_reached()
    }

    fn controls(&self) -> Controls {
        Controls {
            throttle: self.steps.throttle,
            ..Controls::default()
        }
    }
}
