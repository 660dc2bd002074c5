//! Membound: MPLM's guarantee (live phase bounded by the memory size) with lower downtime.
//!
//! Three changes to [`super::Mplm`], none of which can send more pages than MPLM's bound:
//!
//! - **Hot pages wait.** A page written again within an epoch of being resent is hot; the
//!   executor keeps it in the dirty group but sends none while [`Controls::defer_hot`] is on:
//!   resending it would only be wasted, it goes in the stop-and-copy (or the tail). So does a
//!   never-sent page the dirty log shows written: a guest that writes a page before its first
//!   send most often writes it again after it (a working set swept or written at random), and
//!   MPLM sends such a page twice. Held back, it goes once; a first send, it counts against no
//!   resend budget.
//! - **The split adapts.** The dirty share of a cycle is what drains the cold dirty backlog and
//!   keeps up with the measured dirty rate by the time the never-sent group is empty, at most
//!   `dirty_share` (MPLM's 50%): a quiet guest gets its never-sent pages sooner.
//! - **A throttled tail.** When the never-sent group is empty, MPLM stops the VM whatever is
//!   dirty. Membound harvests once more and, if the dirty set would take longer than
//!   `target_downtime` to send, throttles the vCPUs just enough for a pass over the dirty set
//!   (hot pages too) to leave less than the target behind, then harvests and decides again; at
//!   most [`MAX_TAIL_PASSES`] passes and never more resends than MPLM's budget.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Epoch0
//!     Epoch0: epoch 0, never-sent pages only
//!     Epoch0 --> Multiplex: Harvest (since_harvest >= epoch)
//!     Multiplex: adaptive split, cold dirty pages only
//!     Multiplex --> Multiplex: Send / Harvest every epoch
//!     Multiplex --> Tail: never_sent == 0 → Harvest
//!     Epoch0 --> Tail: never_sent == 0 → Harvest
//!     Tail: dirty × page time vs target_downtime
//!     Tail --> [*]: fits, budget spent or MAX_TAIL_PASSES → Switchover
//!     Tail --> Pass: throttle, resend the dirty set
//!     Pass --> Tail: pass done → Harvest
//!     Multiplex --> Hurry: timeout, on_limit = switchover
//!     Hurry --> [*]: never_sent == 0 → Switchover
//!     Multiplex --> [*]: timeout, on_limit = abort → Abort
//! ```

use super::Policy;
use super::{dirty_pass, fill_cycle, multiplex_step, multiplex_timeout, resent, EpochTracker};
use super::{expected_writes, forecast_with_pass, multiplexed_forecast, page_time, Multiplex};
use super::{forecast_from, phi, resend_budget, throttled_page_time};
use super::{Controls, Decision, Forecast, PolicyConfig, Progress};

/// The most passes over the dirty set after the never-sent group is empty.
pub const MAX_TAIL_PASSES: u32 = 3;

/// The share of `target_downtime` a tail pass's throttle aims to leave dirty.
const TAIL_AIM: f64 = 0.75;

/// The tail of the live phase: passes over the dirty set under a throttle.
#[derive(Debug, Clone, Default)]
struct Tail {
    /// Epoch whose harvest has been evaluated.
    evaluated: u32,
    passes: u32,
    /// Pages of the current pass not asked for yet.
    pass_left: u64,
}

/// MPLM with hot-page deferral, an adaptive split and a throttled tail.
#[derive(Debug, Clone)]
pub struct Membound {
    cfg: PolicyConfig,
    /// MPLM's split: the most dirty pages per cycle, and the resend budget's ratio.
    q_dirty: u64,
    q_never: u64,
    harvested: bool,
    hurry: bool,
    limit: bool,
    track: EpochTracker,
    tail: Option<Tail>,
    throttle: f64,
}

impl Membound {
    /// A fresh policy with this configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        let (q_dirty, q_never) = cfg.split();
        Self {
            cfg,
            q_dirty,
            q_never,
            harvested: false,
            hurry: false,
            limit: false,
            track: EpochTracker::default(),
            tail: None,
            throttle: 0.0,
        }
    }

    fn budget_left(&self, p: &Progress) -> u64 {
        resend_budget(p.total_pages, (self.q_dirty, self.q_never)).saturating_sub(resent(p))
    }

    fn max_share(&self) -> f64 {
        self.q_dirty as f64 / (self.q_dirty + self.q_never) as f64
    }

    /// The dirty share that resends the cold backlog and what the guest dirties meanwhile by
    /// the time the never-sent pages are gone: with `x` = dirty rate ÷ link rate (pages), `D`
    /// dirty pages to send satisfy `D = backlog + x (ns + D)`, and the share is `D / (D + ns)`,
    /// at most MPLM's share. But when a resent cold page would most likely be dirtied again
    /// before the never-sent pages are gone (`λ_cold × ns × t > 1`, `λ_cold` the rate at which
    /// a clean page turns cold-dirty), or the guest dirties faster than that share can follow,
    /// resending now is wasted: the share is 0 and the whole budget waits for the tail, where a
    /// throttle keeps resent pages clean.
    fn share(&self, p: &Progress) -> f64 {
        let max = self.max_share();
        let Some(t) = page_time(p) else {
            return max;
        };
        let ns = p.never_sent as f64;
        if self.track.cold_clean_rate() * ns * t > 1.0 {
            return 0.0;
        }
        let x = self.track.dirty_rate() * t;
        if x >= 1.0 {
            return 0.0;
        }
        let backlog = p.dirty.saturating_sub(p.hot) as f64;
        let d = (backlog + ns * x) / (1.0 - x);
        if d + ns <= 0.0 {
            return 0.0;
        }
        let share = d / (d + ns);
        if share > max {
            0.0
        } else {
            share
        }
    }

    /// One cycle of the main phase: the adaptive split, cold dirty pages only, whichever group
    /// has pages left filling the cycle, dirty pages capped by the resend budget.
    fn cycle(&self, p: &Progress) -> Decision {
        let cycle = self.q_dirty + self.q_never;
        let (q_dirty, _) = self.cfg.split_at(self.share(p));
        let q_dirty = q_dirty.min(self.q_dirty);
        let cold = p.dirty.saturating_sub(p.hot);
        fill_cycle(cycle, q_dirty, cold.min(self.budget_left(p)), p.never_sent)
    }

    /// The throttle for a tail pass over `pages` dirty pages of `t` seconds each, so that at
    /// most `target_downtime` worth of pages is dirty after it ([`TAIL_AIM`] of it, for the
    /// model's error). The guest runs a share `g` of the time. A clean page becomes dirty at
    /// `λ` per second (measured over the last epoch, unthrottled); a page of the working set
    /// the executor's write model saw is rewritten at `μ` = its rate ÷ its size, far more
    /// often (a guest that sweeps its working set rewrites every page of it between two
    /// harvests, and the clean rate knows nothing of that).
    /// During a pass of `T = pages × t`, the `C` pages clean at its start and each resent page
    /// (clean for the rest of the pass) are dirtied with chance `1 − e^{−ρgT}` and
    /// `1 − e^{−ρg(T − s)}`, `ρ` the page's rate:
    /// `F(g) = C (1 − e^{−λgT}) + D_ws φ(μgT) + (D − D_ws) φ(ρgT)`, `φ(x) = 1 − (1 − e^{−x}) / x`,
    /// with `D_ws` the resent pages of the working set (at most its size) and `ρ` the larger of
    /// `λ` and the rate at which the model's drift rewrites each of its pages. The throttle is
    /// `1 − g` for the largest `g` with `F ≤ target`; on a second and later pass at least
    /// `1 − (1 − θ_prev) / 4` (the model missed), at most `throttle_max`.
    fn tail_throttle(&self, p: &Progress, pages: u64, t: f64, passes: u32) -> f64 {
        let max = self.cfg.throttle_max.clamp(0.0, crate::vm::MAX_THROTTLE);
        let lambda = self.track.clean_rate() / (1.0 - self.throttle).max(0.01);
        let (wss, mu) = p
            .writes
            .filter(|m| m.wss > 0.0 && m.rate > 0.0)
            .map_or((0.0, 0.0), |m| (m.working_set(), m.rate / m.wss));
        let nu = p.writes.map_or(0.0, |m| m.drift_page_rate());
        // The other resent pages: at the clean rate, or the drift's over its pages if more (a
        // sweep rewrites pages a harvest found dirty already, which the clean rate misses).
        let rho = lambda.max(nu);
        // Aimed below the target: a model off by a little would cost a whole second pass.
        let target = TAIL_AIM * self.cfg.target_downtime.as_secs_f64() / t;
        let d = pages as f64;
        let d_ws = d.min(wss);
        let c = p
            .total_pages
            .saturating_sub(p.never_sent)
            .saturating_sub(p.dirty) as f64;
        let span = d * t;
        // Of pages resent during the pass, the share dirty again at its end is `phi`.
        let dirty_after = |g: f64| {
            let (xl, xm, xr) = (lambda * g * span, mu * g * span, rho * g * span);
            c * -(-xl).exp_m1() + d_ws * phi(xm) + (d - d_ws) * phi(xr)
        };
        let need = if dirty_after(1.0) <= target {
            0.0
        } else {
            // F grows with g: bisect for the largest g that keeps F within the target.
            let (mut lo, mut hi) = (0.0, 1.0);
            for _ in 0..60 {
                let mid = 0.5 * (lo + hi);
                if dirty_after(mid) <= target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            1.0 - lo
        };
        let escalate = if passes > 1 {
            1.0 - (1.0 - self.throttle) / 4.0
        } else {
            0.0
        };
        need.max(escalate).clamp(0.0, max)
    }

    /// Decisions once the never-sent group is empty.
    fn tail(&mut self, p: &Progress) -> Decision {
        if self.hurry {
            return Decision::Switchover;
        }
        let budget = self.budget_left(p);
        let Some(tail) = self.tail.as_mut() else {
            // Harvest first: what the guest wrote since the last harvest counts too.
            self.tail = Some(Tail {
                evaluated: p.epoch,
                ..Tail::default()
            });
            return Decision::Harvest;
        };
        if p.epoch != tail.evaluated {
            tail.evaluated = p.epoch;
            let Some(t) = page_time(p) else {
                return Decision::Switchover;
            };
            let fits = p.dirty as f64 * t <= self.cfg.target_downtime.as_secs_f64();
            if fits || budget == 0 || tail.passes >= MAX_TAIL_PASSES {
                return Decision::Switchover;
            }
            tail.passes += 1;
            tail.pass_left = p.dirty.min(budget);
            let (pages, passes) = (tail.pass_left, tail.passes);
            self.throttle = self.tail_throttle(p, pages, t, passes);
            return self.tail_send(p, budget);
        }
        self.tail_send(p, budget)
    }

    fn tail_send(&mut self, p: &Progress, budget: u64) -> Decision {
        let cycle = self.cfg.cycle();
        match self.tail.as_mut() {
            Some(tail) => dirty_pass(&mut tail.pass_left, p.dirty.min(budget), cycle),
            None => Decision::Switchover,
        }
    }
}

impl Policy for Membound {
    fn name(&self) -> &'static str {
        "membound"
    }

    fn decide(&mut self, p: &Progress) -> Decision {
        self.track.observe(p);
        if self.tail.is_none() {
            let (name, cfg) = (self.name(), &self.cfg);
            if let Some(abort) = multiplex_timeout(name, p, cfg, &mut self.hurry, &mut self.limit) {
                return abort;
            }
        }
        if p.never_sent == 0 {
            return self.tail(p);
        }
        multiplex_step(
            p,
            &self.cfg,
            self.cfg.epoch,
            self.hurry,
            &mut self.harvested,
        )
        .unwrap_or_else(|| self.cycle(p))
    }

    /// Model: every never-sent page goes once; cold resends follow the current split while
    /// dirty pages are there (within the budget); what is dirty when the never-sent group
    /// empties goes in a tail pass if it would exceed the target (leaving about the target's
    /// worth for the stop-and-copy), else in the stop-and-copy.
    fn forecast(&self, p: &Progress) -> Forecast {
        let t = page_time(p);
        let target_pages = t.map_or(f64::MAX, |t| self.cfg.target_downtime.as_secs_f64() / t);
        let budget = self.budget_left(p) as f64;
        if let Some(tail) = &self.tail {
            let pass = tail.pass_left.min(p.dirty) as f64;
            let pass_time = t.map_or(0.0, |t| throttled_page_time(p, t, self.throttle));
            let written = expected_writes(
                p,
                &self.track,
                pass * pass_time,
                0.0,
                false,
                self.throttle,
                0.0,
            );
            let after = written.over(p.dirty as f64 - pass, p.total_pages as f64);
            return forecast_with_pass(p, 0.0, (pass, pass_time), after);
        }
        let share = if self.hurry { 0.0 } else { self.share(p) };
        let cold = p.dirty.saturating_sub(p.hot) as f64;
        let (live, at_end) = multiplexed_forecast(
            p,
            Multiplex {
                track: &self.track,
                ratio: share / (1.0 - share),
                epoch: self.cfg.epoch,
                resendable: cold,
                budget,
                holds: true,
            },
        );
        let budget_after = (budget - (live - p.never_sent as f64)).max(0.0);
        let tail = !self.hurry && at_end > target_pages && budget_after > 0.0;
        match t {
            Some(t) if tail => {
                let pass = at_end.min(budget_after);
                let left = (at_end - pass + TAIL_AIM * target_pages).min(at_end);
                // The pass goes under the throttle the tail would choose then, faster than now.
                let then = Progress {
                    never_sent: 0,
                    dirty: at_end as u64,
                    ..p.clone()
                };
                let throttle = self.tail_throttle(&then, pass as u64, t, 1);
                let pass_time = throttled_page_time(p, t, throttle);
                forecast_with_pass(p, live, (pass, pass_time), left)
            }
            _ => forecast_from(p, live, at_end),
        }
    }

    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(self.clone())
    }

    fn limit_reached(&self) -> bool {
        self.limit
    }

    fn controls(&self) -> Controls {
        Controls {
            throttle: self.throttle,
            cores: None,
            defer_hot: self.tail.is_none(),
        }
    }
}
