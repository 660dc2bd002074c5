//! Where a sweeping guest's next writes fall, page by page.
//!
//! A guest that sweeps memory (`dirty-all`, an MG-like solver) writes each page it covers once
//! per period. Whether a page sent now is dirty at the switchover then depends on where the
//! sweep stands against the sends, not on how fast the guest writes on average: on the
//! simulator, the mean model ([`super::WriteModel`]) forecast the stop-and-copy of such a
//! guest anywhere from half to twice its size at 25% progress, depending on where the sweep
//! started. The dirty log shows where it stands. Read after read, a [`WriteClock`] notes when
//! each of a sample of the pages was last seen written; a page last written `a` seconds ago is
//! written again `P − (a mod P)` seconds from now, `P` being the sweep's period, and again
//! every `P` after that. [`LastWrites`] hands those ages to the forecasts.
//!
//! The dirty log shows one write per page between two re-arms (the send of the page), so the
//! age of a page written several times since is that of an older write: a whole number of
//! periods older, which the modulo absorbs, as far as the period is right.

use std::fmt;
use std::time::Duration;

/// At most this many pages are followed; a larger guest is sampled evenly.
pub const SAMPLES: u64 = 1 << 16;

/// Follows, read after read of the dirty log, when each sampled page was last seen written.
#[derive(Debug, Clone)]
pub struct WriteClock {
    /// Every `stride`-th page is followed.
    stride: u64,
    pages: u64,
    /// Per sampled page: seconds (any fixed origin) of the last write seen; NaN if none.
    last: Vec<f32>,
    /// Per sampled page: its bit in the previous read.
    was_set: Vec<bool>,
    /// When the previous read was made; NaN before the first.
    prev_read: f64,
}

/// Where a page stands in a migration, for [`WriteClock::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not sent yet.
    NeverSent,
    /// Sent, and not written since.
    Clean,
    /// Sent and written since (in a dirty group, or not harvested yet).
    Dirty,
    /// Not guest memory (a hole between regions).
    Absent,
}

impl WriteClock {
    /// A clock over `pages` pages (page numbers `0..pages`), nothing seen yet.
    pub fn new(pages: u64) -> Self {
        let stride = pages.div_ceil(SAMPLES).max(1);
        let n = pages.div_ceil(stride) as usize;
        Self {
            stride,
            pages,
            last: vec![f32::NAN; n],
            was_set: vec![false; n],
            prev_read: f64::NAN,
        }
    }

    /// Notes a read of the log at `secs`: a sampled page whose bit `is_set` now and was clear
    /// at the previous read was written in between, at the midpoint as far as is known (at
    /// `secs` if this is the first read).
    pub fn read(&mut self, secs: f64, is_set: impl Fn(u64) -> bool) {
        let from = if self.prev_read.is_nan() {
            secs
        } else {
            self.prev_read
        };
        let at = (0.5 * (from + secs)) as f32;
        for (i, (last, was)) in self.last.iter_mut().zip(&mut self.was_set).enumerate() {
            let now = is_set(i as u64 * self.stride);
            if now && !*was {
                *last = at;
            }
            *was = now;
        }
        self.prev_read = secs;
    }

    /// The sampled pages' ages at `secs` by state, the never-sent ones in the order they go
    /// out: ascending from page `cursor`, then from the start.
    /// `taken` is the time of the read in the migration's clock ([`super::Progress::elapsed`]).
    pub fn snapshot(
        &self,
        secs: f64,
        taken: Duration,
        cursor: u64,
        state: impl Fn(u64) -> PageState,
    ) -> LastWrites {
        let mut out = LastWrites {
            stride: self.stride as f64,
            taken,
            ..LastWrites::default()
        };
        let first = cursor.min(self.pages).div_ceil(self.stride) as usize;
        let order = (first..self.last.len()).chain(0..first);
        for i in order {
            let page = i as u64 * self.stride;
            // NaN (never seen) stays NaN.
            let age = (secs - f64::from(self.last[i])) as f32;
            let age = if age < 0.0 { 0.0 } else { age };
            match state(page) {
                PageState::NeverSent => out.never_sent.push(age),
                PageState::Clean => out.clean.push(age),
                PageState::Dirty => out.dirty.push(age),
                PageState::Absent => {}
            }
        }
        out
    }
}

/// How long ago a sample of the pages was last seen written, by where they stand: what a
/// [`WriteClock`] saw at the last read. NaN: never seen written (not in the sweep).
#[derive(Clone, Default, PartialEq)]
pub struct LastWrites {
    /// Pages each sample stands for.
    pub stride: f64,
    /// When the log was read, in the migration's clock ([`super::Progress::elapsed`]).
    pub taken: Duration,
    /// The never-sent pages, in the order they will be sent.
    pub never_sent: Vec<f32>,
    /// The pages sent and not written since.
    pub clean: Vec<f32>,
    /// The pages sent and written since.
    pub dirty: Vec<f32>,
}

impl fmt::Debug for LastWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LastWrites {{ stride: {}, samples: never_sent {}, clean {}, dirty {} }}",
            self.stride,
            self.never_sent.len(),
            self.clean.len(),
            self.dirty.len()
        )
    }
}

/// A sampled page as a forecast sees it: when it goes out and when it is written.
#[derive(Debug, Clone, Copy)]
pub struct SweptPage {
    /// Seconds from now until it is sent (0 if it was sent already).
    pub sent_in: f64,
    /// Whether it is dirty now.
    pub dirty: bool,
    age: f64,
    period: f64,
}

impl SweptPage {
    /// Whether the sweep writes it in `(from, to]`, seconds from now.
    pub fn written_in(&self, from: f64, to: f64) -> bool {
        let next = from + self.period - (from + self.age).rem_euclid(self.period);
        next <= to
    }

    /// Whether the sweep writes it after its send and by `to`.
    pub fn dirtied_by(&self, to: f64) -> bool {
        self.sent_in < to && self.written_in(self.sent_in, to)
    }
}

impl LastWrites {
    /// Each sampled page the sweep writes, with a `period` in seconds, at `now` in the
    /// migration's clock: the never-sent ones still never-sent (`never_sent` of them, fewer
    /// than at the read: the first ones in the order went out since, just now) going out
    /// evenly over the next `sending` seconds; pages never seen written are left out. Sum what
    /// the forecast needs and multiply by [`LastWrites::stride`].
    pub fn pages(
        &self,
        period: f64,
        now: Duration,
        never_sent: u64,
        sending: f64,
    ) -> impl Iterator<Item = SweptPage> + '_ {
        let since = now.saturating_sub(self.taken).as_secs_f64();
        let left = ((never_sent as f64 / self.stride).ceil() as usize).min(self.never_sent.len());
        let gone = self.never_sent.len() - left;
        let n = left.max(1) as f64;
        let never =
            self.never_sent
                .iter()
                .enumerate()
                .map(move |(k, &a)| match k.checked_sub(gone) {
                    // The k-th of n goes out at the end of its share of the time.
                    Some(k) => (sending * (k as f64 + 1.0) / n, false, a),
                    None => (0.0, false, a),
                });
        let clean = self.clean.iter().map(|&a| (0.0, false, a));
        let dirty = self.dirty.iter().map(|&a| (0.0, true, a));
        never
            .chain(clean)
            .chain(dirty)
            .filter(|&(_, _, a)| a.is_finite())
            .map(move |(sent_in, dirty, age)| SweptPage {
                sent_in,
                dirty,
                age: f64::from(age) + since,
                period,
            })
    }

    /// Sampled pages ever seen written.
    pub fn seen(&self) -> usize {
        let finite = |v: &Vec<f32>| v.iter().filter(|a| a.is_finite()).count();
        finite(&self.never_sent) + finite(&self.clean) + finite(&self.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read notes a page when its bit turns on, at the midpoint since the previous read; a
    /// bit that stays on is the same write.
    #[test]
    fn a_write_is_dated_when_its_bit_turns_on() {
        let mut c = WriteClock::new(4);
        c.read(0.0, |_| false);
        c.read(1.0, |p| p == 1);
        c.read(2.0, |p| p == 1 || p == 2);
        let s = c.snapshot(3.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!(s.clean.len(), 4);
        assert!(s.clean[0].is_nan() && s.clean[3].is_nan());
        assert_eq!((s.clean[1], s.clean[2]), (2.5, 1.5));
        // Re-armed (sent) and written again: a new date.
        c.read(4.0, |p| p == 2);
        c.read(5.0, |p| p == 1 || p == 2);
        let s = c.snapshot(5.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!((s.clean[1], s.clean[2]), (0.5, 3.5));
    }

    /// A large guest is sampled; the never-sent pages come in sending order from the cursor.
    #[test]
    fn samples_go_in_sending_order() {
        let mut c = WriteClock::new(4 * SAMPLES);
        assert_eq!(c.last.len() as u64, SAMPLES);
        c.read(1.0, |p| p % 8 == 0);
        let s = c.snapshot(1.5, Duration::ZERO, 2 * SAMPLES, |p| {
            if p % 8 == 0 {
                PageState::NeverSent
            } else {
                PageState::Dirty
            }
        });
        assert_eq!(s.stride, 4.0);
        assert_eq!(s.never_sent.len() as u64, SAMPLES / 2);
        assert_eq!(s.seen() as u64, SAMPLES / 2);
        assert!(s.dirty.iter().all(|a| a.is_nan()));
    }

    /// A page last written 0.3 s ago with a 1 s period is next written 0.7 s from now, then
    /// every second; sent 0.8 s from now, it is dirtied at 1.7 s.
    #[test]
    fn the_sweep_comes_back_once_a_period() {
        let lw = LastWrites {
            stride: 1.0,
            taken: Duration::from_millis(100),
            never_sent: vec![0.2],
            clean: vec![0.2],
            dirty: vec![f32::NAN],
        };
        // Read 0.1 s ago, when the pages were last written 0.2 s before.
        let pages: Vec<_> = lw.pages(1.0, Duration::from_millis(200), 1, 0.8).collect();
        assert_eq!(pages.len(), 2);
        let (never, clean) = (pages[0], pages[1]);
        assert!(clean.written_in(0.0, 0.71) && !clean.written_in(0.0, 0.69));
        assert!(clean.written_in(0.71, 1.71) && !clean.written_in(0.71, 1.69));
        assert!(clean.dirtied_by(0.71) && !clean.dirtied_by(0.69));
        assert!((never.sent_in - 0.8).abs() < 1e-6);
        assert!(!never.dirtied_by(1.69) && never.dirtied_by(1.71));
    }
}
