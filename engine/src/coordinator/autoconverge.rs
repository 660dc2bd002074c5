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
    throttle: f64,
    /// Consecutive epochs above the trigger since the last step.
    high: u32,
    seen_epoch: u32,
    pages_at_harvest: u64,
}

impl Autoconverge {
    /// A fresh policy with this configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            precopy: Precopy::new(cfg.clone()),
            cfg,
            throttle: 0.0,
            high: 0,
            seen_epoch: 0,
            pages_at_harvest: 0,
        }
    }

    /// The throttle in force.
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    fn observe(&mut self, p: &Progress) {
        if p.epoch == self.seen_epoch {
            return;
        }
        self.seen_epoch = p.epoch;
        let sent = p.pages_sent.saturating_sub(self.pages_at_harvest);
        self.pages_at_harvest = p.pages_sent;
        if p.dirtied_last_epoch as f64 > self.cfg.throttle_trigger * sent as f64 {
            self.high += 1;
        } else {
            self.high = 0;
        }
        if self.high >= 2 {
            self.high = 0;
            let max = self.cfg.throttle_max.clamp(0.0, crate::vm::MAX_THROTTLE);
            self.throttle = if self.throttle == 0.0 {
                self.cfg.throttle_initial
            } else {
                self.throttle + self.cfg.throttle_step
            }
            .min(max);
        }
    }
}

impl Policy for Autoconverge {
    fn name(&self) -> &'static str {
        "autoconverge"
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        self.observe(p);
        self.precopy.decide(p)
    }

    fn forecast(&self, p: &Progress) -> Forecast {
        self.precopy.forecast_throttled(p, self.throttle)
    }

    fn limit_reached(&self) -> bool {
        self.precopy.limit_reached()
    }

    fn controls(&self) -> Controls {
        Controls {
            throttle: self.throttle,
            ..Controls::default()
        }
    }
}
