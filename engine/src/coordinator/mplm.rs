//! Memory-bound pre-copy exactly as published (MPLM, Chanchio & Yaothanee), for comparison
//! with [`super::Membound`]; and time-bound migration (TLM, Chanchio et al.), which is the same
//! machine with its own split and epoch: a mass transfer of every page once, in address order,
//! with a dirty-page sender taking `timebound_dirty_share` of each cycle, harvested every
//! `timebound_epoch`, the VM stopping when the mass transfer ends.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Epoch0
//!     Epoch0: epoch 0, never-sent pages only
//!     Epoch0 --> Epoch0: Send{cycle, 0}
//!     Epoch0 --> Multiplex: Harvest (since_harvest >= epoch)
//!     Multiplex: cycles split dirty_share dirty / rest never-sent
//!     Multiplex --> Multiplex: Send{q_n, q_d} / Harvest every epoch
//!     Epoch0 --> Hurry: timeout, on_limit = switchover
//!     Multiplex --> Hurry: timeout, on_limit = switchover
//!     Hurry: never-sent pages only, no harvests
//!     Epoch0 --> [*]: never_sent == 0 → Switchover
//!     Multiplex --> [*]: never_sent == 0 → Switchover
//!     Hurry --> [*]: never_sent == 0 → Switchover
//!     Multiplex --> [*]: timeout, on_limit = abort → Abort
//! ```

use std::time::Duration;

use super::EpochTracker;
use super::Policy;
use super::{fill_cycle, forecast_from, multiplex_step, multiplex_timeout, multiplexed_forecast};
use super::{resend_budget, resent, Multiplex};
use super::{Decision, Forecast, PolicyConfig, Progress};

/// Memory-bound pre-copy: never-sent and dirty pages multiplexed in fixed cycles; the live phase
/// ends exactly when no never-sent page is left. No downtime knob; time bounded by memory size.
#[derive(Debug, Clone)]
pub struct Mplm {
    name: &'static str,
    cfg: PolicyConfig,
    epoch: Duration,
    q_dirty: u64,
    q_never: u64,
    /// The previous decision was a harvest: send before harvesting again (progress guarantee).
    harvested: bool,
    /// The timeout passed with `on_limit = switchover`: send only never-sent pages.
    hurry: bool,
    limit: bool,
    track: EpochTracker,
}

impl Mplm {
    /// A fresh MPLM policy with this configuration (`dirty_share`, `epoch`).
    pub fn new(cfg: PolicyConfig) -> Self {
        let split = cfg.split();
        let epoch = cfg.epoch;
        Self::with("mplm", cfg, split, epoch)
    }

    /// A fresh TLM policy with this configuration (`timebound_dirty_share`,
    /// `timebound_epoch`).
    pub fn timebound(cfg: PolicyConfig) -> Self {
        let split = cfg.split_at(cfg.timebound_dirty_share);
        let epoch = cfg.timebound_epoch;
        Self::with("timebound", cfg, split, epoch)
    }

    fn with(name: &'static str, cfg: PolicyConfig, split: (u64, u64), epoch: Duration) -> Self {
        let (q_dirty, q_never) = split;
        Self {
            name,
            cfg,
            epoch,
            q_dirty,
            q_never,
            harvested: false,
            hurry: false,
            limit: false,
            track: EpochTracker::default(),
        }
    }

    /// One multiplexing cycle: up to `q_dirty` dirty pages, never-sent pages for the rest, and
    /// whichever group has pages left fills the cycle when the other runs short. Dirty pages are
    /// also capped by what is left of the live resend budget.
    fn cycle(&self, p: &Progress) -> Decision {
        let cycle = self.q_dirty + self.q_never;
        let budget =
            resend_budget(p.total_pages, (self.q_dirty, self.q_never)).saturating_sub(resent(p));
        fill_cycle(cycle, self.q_dirty, p.dirty.min(budget), p.never_sent)
    }
}

impl Policy for Mplm {
    fn name(&self) -> &'static str {
        self.name
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        self.track.observe(p);
        if p.never_sent == 0 {
            return Decision::Switchover;
        }
        let (cfg, name) = (&self.cfg, self.name);
        if let Some(abort) = multiplex_timeout(name, p, cfg, &mut self.hurry, &mut self.limit) {
            return abort;
        }
        multiplex_step(p, &self.cfg, self.epoch, self.hurry, &mut self.harvested)
            .unwrap_or_else(|| self.cycle(p))
    }

    /// Model (`multiplexed_forecast`): every never-sent page goes once; resends follow the
    /// cycle ratio `q_d / q_n` from the first harvest on, while dirty pages are there, within
    /// the resend budget; the stop-and-copy sends what is dirty then.
    fn forecast(&self, p: &Progress) -> Forecast {
        let ratio = if self.hurry {
            0.0
        } else {
            self.q_dirty as f64 / self.q_never as f64
        };
        let budget =
            resend_budget(p.total_pages, (self.q_dirty, self.q_never)).saturating_sub(resent(p));
        let (live, at_end) = multiplexed_forecast(
            p,
            Multiplex {
                track: &self.track,
                ratio,
                epoch: self.epoch,
                resendable: p.dirty as f64,
                budget: budget as f64,
                holds: false,
            },
        );
        forecast_from(p, live, at_end)
    }

    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(self.clone())
    }

    fn limit_reached(&self) -> bool {
        self.limit
    }
}
