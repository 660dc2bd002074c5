//! Where a sweeping guest's next writes fall, page by page.
//!
//! A guest that sweeps memory (`dirty-all`, an MG-like solver) writes each page it covers once
//! per period. Whether a page sent now is dirty at the switchover then depends on where the
//! sweep stands against the sends, not on how fast the guest writes on average: on the
//! simulator, the mean model ([`super::WriteModel`]) forecast the stop-and-copy of such a
//! guest anywhere from half to twice its size at 25% progress, depending on where the sweep
//! started. The dirty log shows where it stands. Read after read, a [`WriteClock`] notes in
//! what order a sample of the pages was first seen written, and which pages each read showed.
//!
//! - **The sweep's order.** The probe clears the whole log before it starts, so the first lap
//!   after it shows every write: the order in which pages were first seen written is the
//!   order the sweep writes them in, lap after lap. Pages not seen yet (the first lap is not
//!   over) come after the others, in page order from where the sweep stands.
//! - **Where it stands.** The pages the latest read showed are where the sweep was then (the
//!   densest run of them: a few pages the guest rewrites all the time show wherever they were
//!   sent); it has moved on since at its current speed.
//! - **How fast it moves.** Where it stood read after read: the first page of each run was
//!   the first written after the read before. The write model's speed (the probe's, scaled by
//!   the vCPUs' CPU time) was half the sweep's on the testbed late in a migration. It is taken
//!   in the first lap only (see [`super::sweep`]).
//!
//! A page `d` pages ahead of the sweep in its order is written again `d ÷ speed` seconds from
//! now, and every period after that ([`SweepOrder`]). Dating each page by its last write
//! instead (written again a period after it) went wrong on the testbed: before the migration
//! the guest ran two to three times faster, so its pages were due much sooner than their
//! dates said; and the log shows one write per page between two re-arms (the send of the
//! page), so a never-sent page's date stays at its first write, laps old.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// At most this many pages are followed; a larger guest is sampled evenly.
pub const SAMPLES: u64 = 1 << 16;

/// Follows, read after read of the dirty log, in what order the sampled pages were first seen
/// written, where the sweep stood at the latest read that showed writes, and how fast it moves.
#[derive(Debug, Clone)]
pub struct WriteClock {
    /// Every `stride`-th page is followed.
    stride: u64,
    pages: u64,
    /// Per sampled page: its place in the order of first writes; NaN if never seen written.
    place: Vec<f32>,
    /// Sampled pages seen written.
    seen: usize,
    /// Per sampled page: its bit in the previous read.
    was_set: Vec<bool>,
    /// The previous read, and the last one that showed writes with the read before it.
    prev_read: f32,
    latest: (f32, f32),
    /// The first and last places of the sweep's run at the latest read that showed writes.
    run: (f32, f32),
    /// Where the sweep stood at the reads before those in a row that showed it, over the last
    /// [`SPEED_WINDOW`]: `(seconds of the read before, first place of the run)`.
    heads: VecDeque<(f32, f32)>,
    /// When the guest's speed last changed ([`WriteClock::speed_changes`]).
    speed_from: f32,
}

/// Over how long [`WriteClock`] measures the sweep's speed, and in how many steps from one
/// read to the next at least.
const SPEED_WINDOW: f32 = 0.5;
const SPEED_STEPS: usize = 3;

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
            place: vec![f32::NAN; n],
            seen: 0,
            was_set: vec![false; n],
            prev_read: f32::NAN,
            latest: (f32::NAN, f32::NAN),
            run: (f32::NAN, f32::NAN),
            heads: VecDeque::new(),
            speed_from: f32::NEG_INFINITY,
        }
    }

    /// Notes a read of the log at `secs`: a sampled page whose bit `is_set` now and was clear
    /// at the previous read was written in between. The pages first seen go after those seen
    /// before, in page order from the page after the widest gap between them (a sweep that
    /// came round to the first pages within the read comes round last).
    pub fn read(&mut self, secs: f64, is_set: impl Fn(u64) -> bool) {
        let at = secs as f32;
        let (mut shown, mut new) = (Vec::new(), Vec::new());
        for (i, was) in self.was_set.iter_mut().enumerate() {
            let now = is_set(i as u64 * self.stride);
            if now && !*was {
                if self.place[i].is_nan() {
                    new.push(i);
                }
                shown.push(i);
            }
            *was = now;
        }
        let before = std::mem::replace(&mut self.prev_read, at);
        let n = self.place.len();
        let gap = |k: usize| new.get(k + 1).map_or(new[0] + n, |&i| i) - new[k];
        if let Some(widest) = (0..new.len()).max_by_key(|&k| gap(k)) {
            let len = new.len();
            new.rotate_left((widest + 1) % len);
        }
        for i in new {
            self.place[i] = self.seen as f32;
            self.seen += 1;
        }
        if shown.is_empty() {
            return;
        }
        // Whether the read before showed writes too (for the speed, below).
        let in_a_row = self.latest.1 == before;
        self.latest = (before, at);
        let mut places: Vec<f32> = shown.into_iter().map(|i| self.place[i]).collect();
        let lap = self.seen as f32;
        self.run = sweep_run(&mut places, lap);
        // The sweep's speed from reads in a row that showed it: the first page of its run was
        // the first written after the read before, where the sweep stood then. Reads that
        // show nothing (the sweep crossing pages not re-armed since it last wrote them) leave
        // gaps it may go round in.
        if !in_a_row {
            self.heads.clear();
        }
        if before >= self.speed_from {
            self.heads.push_back((before, self.run.0 % lap));
        }
        while let (Some(f), Some(b)) = (self.heads.front(), self.heads.back()) {
            if b.0 - f.0 <= SPEED_WINDOW {
                break;
            }
            self.heads.pop_front();
        }
    }

    /// The guest's speed changes at `secs` (the migration starts and takes cores from it):
    /// the sweep's speed is measured anew from there.
    pub fn speed_changes(&mut self, secs: f64) {
        self.heads.clear();
        self.speed_from = secs as f32;
    }

    /// Sampled places per second the sweep moved on by over the last [`SPEED_WINDOW`], read
    /// after read: the median of the steps (forward less than half a lap, else back), from
    /// [`SPEED_STEPS`] on; else 0. A step falls short when the sends re-arm pages right behind
    /// the sweep (the log never shows those written), long when a read's run is found
    /// elsewhere; the upper quartile let the long ones through on the testbed.
    fn speed(&self) -> f64 {
        let lap = self.seen as f32;
        let mut rates: Vec<f64> = (1..self.heads.len())
            .map(|k| {
                let ((t0, p0), (t1, p1)) = (self.heads[k - 1], self.heads[k]);
                let d = (p1 - p0).rem_euclid(lap);
                let d = if d > 0.5 * lap { d - lap } else { d };
                f64::from(d) / f64::from(t1 - t0).max(1e-3)
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        if rates.len() < SPEED_STEPS {
            return 0.0;
        }
        rates[rates.len() / 2].max(0.0)
    }

    /// The sampled pages' places in the sweep's order and where the sweep stood at `secs`, by
    /// state, the never-sent ones in the order they go out: ascending from page `cursor`, then
    /// from the start. `taken` is the time of the read in the migration's clock
    /// ([`super::Progress::elapsed`]).
    pub fn snapshot(
        &self,
        secs: f64,
        taken: Duration,
        cursor: u64,
        state: impl Fn(u64) -> PageState,
    ) -> SweepOrder {
        let mut place = self.place.clone();
        let mut out = SweepOrder {
            stride: self.stride as f64,
            taken,
            speed: self.speed(),
            ..SweepOrder::default()
        };
        // The pages the latest read showed written, in the sweep's order.
        let (before, latest) = self.latest;
        if latest.is_finite() {
            let (first, last) = self.run;
            out.head = Head {
                first,
                last,
                span: if before.is_finite() {
                    latest - before
                } else {
                    0.0
                },
                age: (secs as f32 - latest).max(0.0),
            };
        }
        // The pages not seen written: the sweep comes to those it covers after the others,
        // in page order from where it stands (as a sweep in address order does).
        let n = place.len();
        out.seen = self.seen;
        let head = (out.head.last.round() as usize % self.seen.max(1)) as f32;
        let from = (0..n).find(|&i| place[i] == head).unwrap_or(0);
        let mut next = self.seen;
        for i in (from..n).chain(0..from) {
            if place[i].is_nan() {
                place[i] = next as f32;
                next += 1;
            }
        }
        let first = cursor.min(self.pages).div_ceil(self.stride) as usize;
        for i in (first..place.len()).chain(0..first) {
            let page = i as u64 * self.stride;
            match state(page) {
                PageState::NeverSent => out.never_sent.push(place[i]),
                PageState::Clean => out.clean.push(place[i]),
                PageState::Dirty => out.dirty.push(place[i]),
                PageState::Absent => {}
            }
        }
        out
    }
}

/// The first and last of the `places` a read showed written that belong to the sweep's run
/// (the last a lap on if the run goes past the end of an order of `lap` places). Besides the
/// sweep, a guest rewrites a few pages over and over (its stack, counters), which show
/// wherever they were sent since: the run is the densest quarter lap of the places, its
/// outer hundredths left out.
fn sweep_run(places: &mut [f32], lap: f32) -> (f32, f32) {
    places.sort_by(f32::total_cmp);
    let n = places.len();
    // Place `k` of the order doubled (the second time a lap on), so that a run may wrap.
    let at = |k: usize| {
        if k < n {
            places[k]
        } else {
            places[k - n] + lap
        }
    };
    let (mut best, mut end) = ((0, 0), 0);
    for start in 0..n {
        end = end.max(start);
        while end < start + n && at(end) < at(start) + 0.25 * lap {
            end += 1;
        }
        if end - start > best.1 - best.0 {
            best = (start, end);
        }
    }
    let (start, end) = best;
    let trim = (end - start) / 100;
    let first = at(start + trim);
    let last = at(end - 1 - trim);
    // A run that starts past the end of the order starts at its beginning.
    if first >= lap {
        (first - lap, last - lap)
    } else {
        (first, last)
    }
}

/// Where a sample of the pages stands in a sweep, by where they stand in the migration: what a
/// [`WriteClock`] saw at the last read. A page's place is how many sampled pages come before
/// it in the sweep's order: the pages seen written first, in the order first seen, then the
/// others.
#[derive(Clone, Default, PartialEq)]
pub struct SweepOrder {
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
    /// The pages the latest read that showed writes showed, in the sweep's order.
    pub head: Head,
    /// Sampled pages ever seen written: the first places.
    pub seen: usize,
    /// Sampled places per second the sweep moved on by lately, as the log showed it; 0 if
    /// not measured.
    pub speed: f64,
}

/// The pages a read of the log showed written, as places in the sweep's order: where the
/// sweep stood.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Head {
    /// The first and last of them (the last may lie a lap on, past the end of the order).
    pub first: f32,
    pub last: f32,
    /// Seconds since the read before, and since this read when the snapshot was made.
    pub span: f32,
    pub age: f32,
}

impl Head {
    /// Where the sweep stands at the snapshot, at `speed` places per second. At the read, it
    /// had passed the last page shown, and the first was written after the read before, so
    /// it had gone no further than the first plus `span` seconds; it is taken halfway.
    fn at(&self, speed: f64) -> f64 {
        let passed = f64::from(self.last);
        let reach = f64::from(self.first) + f64::from(self.span) * speed;
        0.5 * (passed + reach.max(passed)) + f64::from(self.age) * speed
    }
}

impl fmt::Debug for SweepOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SweepOrder {{ stride: {}, samples: never_sent {}, clean {}, dirty {}, seen {}, \
             speed {:.0}/s, {:?} }}",
            self.stride,
            self.never_sent.len(),
            self.clean.len(),
            self.dirty.len(),
            self.seen,
            self.speed,
            self.head
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
    /// Seconds from now to its next write, in `(0, period]`.
    next: f64,
    period: f64,
}

impl SweptPage {
    /// Whether the sweep writes it in `(from, to]`, seconds from now.
    pub fn written_in(&self, from: f64, to: f64) -> bool {
        let laps = ((from - self.next) / self.period).floor() + 1.0;
        self.next + laps.max(0.0) * self.period <= to
    }

    /// Whether the sweep writes it after its send and by `to`.
    pub fn dirtied_by(&self, to: f64) -> bool {
        self.sent_in < to && self.written_in(self.sent_in, to)
    }
}

impl SweepOrder {
    /// Each sampled page the sweep writes, over `set` pages with a `period` in seconds, at
    /// `now` in the migration's clock: the never-sent ones still never-sent (`never_sent` of
    /// them, fewer than at the read: the first ones in the order went out since, just now)
    /// going out evenly over the next `sending` seconds; pages placed past `set` are not in
    /// the sweep, and are left out. Sum what the forecast needs and multiply by
    /// [`SweepOrder::stride`].
    pub fn pages(
        &self,
        period: f64,
        set: f64,
        now: Duration,
        never_sent: u64,
        sending: f64,
    ) -> impl Iterator<Item = SweptPage> + '_ {
        let since = now.saturating_sub(self.taken).as_secs_f64();
        let left = ((never_sent as f64 / self.stride).ceil() as usize).min(self.never_sent.len());
        let gone = self.never_sent.len() - left;
        let n = left.max(1) as f64;
        // In sampled pages: the sweep's length (at least the pages seen) and where it stands now.
        let lap = (set / self.stride).max(self.seen as f64).max(1.0);
        let speed = lap / period;
        let head = self.head.at(speed) + since * speed;
        let never =
            self.never_sent
                .iter()
                .enumerate()
                .map(move |(k, &x)| match k.checked_sub(gone) {
                    // The k-th of n goes out at the end of its share of the time.
                    Some(k) => (sending * (k as f64 + 1.0) / n, false, x),
                    None => (0.0, false, x),
                });
        let clean = self.clean.iter().map(|&x| (0.0, false, x));
        let dirty = self.dirty.iter().map(|&x| (0.0, true, x));
        never
            .chain(clean)
            .chain(dirty)
            .filter(move |&(_, _, x)| f64::from(x) < lap)
            .map(move |(sent_in, dirty, x)| {
                // Pages ahead of the sweep, in its order; one just written is a lap ahead.
                let ahead = lap - (head - f64::from(x)).rem_euclid(lap);
                SweptPage {
                    sent_in,
                    dirty,
                    next: ahead / speed,
                    period,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page is placed by its first seen write; ties go in page order. The latest read that
    /// showed writes shows where the sweep stands; a page re-armed (sent) and written again
    /// keeps its place.
    #[test]
    fn pages_are_placed_in_the_order_first_seen() {
        let mut c = WriteClock::new(4);
        c.read(0.0, |_| false);
        c.read(1.0, |p| p == 2);
        c.read(2.0, |p| p >= 2);
        let s = c.snapshot(2.5, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!((s.clean[2], s.clean[3]), (0.0, 1.0));
        // Not seen yet: after the others, from where the sweep stands (page 3) in page order.
        assert_eq!((s.clean[0], s.clean[1], s.seen), (2.0, 3.0, 2));
        let h = s.head;
        assert_eq!((h.first, h.last, h.span, h.age), (1.0, 1.0, 1.0, 0.5));
        // Page 2 re-armed (sent) and written again: the sweep has come round to it; its place
        // stays. Page 0 is new, after the others.
        c.read(3.0, |p| p == 3);
        c.read(4.0, |p| p != 1);
        let s = c.snapshot(4.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!((s.clean[0], s.clean[2], s.clean[3]), (2.0, 0.0, 1.0));
    }

    /// A read that spans the end of the sweep's order and its start ends a lap on.
    #[test]
    fn the_sweep_stands_past_the_wrap() {
        let mut c = WriteClock::new(8);
        for (t, p) in (0..8).enumerate() {
            c.read(t as f64, |q| q == p);
        }
        // Pages 7 and 0 written again (re-armed in between): it wrapped onto 0.
        c.read(8.5, |_| false);
        c.read(9.0, |q| q == 7 || q == 0);
        let s = c.snapshot(9.0, Duration::ZERO, 0, |_| PageState::Clean);
        let h = s.head;
        assert_eq!((h.first, h.last, h.span), (7.0, 8.0, 0.5));
        // Ten places a second: it had passed place 8 and gone no further than 7 + 5.
        assert_eq!(h.at(10.0), 10.0);
    }

    /// The sweep's run among a read's pages: the densest quarter lap, a lap on past the end.
    #[test]
    fn a_few_pages_written_elsewhere_are_not_the_sweep() {
        // 100 places; the run 40..=49, and pages at 5 and 90 written too.
        let mut places: Vec<f32> = (40..50).chain([5, 90]).map(|x| x as f32).collect();
        assert_eq!(sweep_run(&mut places, 100.0), (40.0, 49.0));
        // The run 95..=99, 0..=4 wraps; a page at 50.
        let mut places: Vec<f32> = (0..5)
            .chain(95..100)
            .chain([50])
            .map(|x| x as f32)
            .collect();
        assert_eq!(sweep_run(&mut places, 100.0), (95.0, 104.0));
    }

    /// The sweep's speed is where it stood read after read: 20 pages every 0.1 s, 200 a
    /// second once three steps are seen. A read that shows nothing starts the count again
    /// (the sweep may have gone round meanwhile), as does a change of the guest's speed.
    #[test]
    fn the_sweep_moves_on_at_the_speed_the_reads_show() {
        let mut c = WriteClock::new(1000);
        // A first lap: by read `k`, the pages below 20 k are written.
        let read = |c: &mut WriteClock, k: u64| c.read(k as f64 * 0.1, |p| p < 20 * k);
        for k in 0..=3 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "two steps are not enough");
        read(&mut c, 4);
        assert!((c.speed() - 200.0).abs() < 0.1, "{}", c.speed());
        // A read at 0.5 s that shows nothing, then the sweep shown again.
        c.read(0.5, |p| p < 80);
        for k in 6..=8 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "counted again from 0.5 s");
        read(&mut c, 9);
        assert!((c.speed() - 200.0).abs() < 0.1, "{}", c.speed());
        c.speed_changes(0.9);
        for k in 10..=12 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "counted again from the change");
    }

    /// A large guest is sampled; the never-sent pages come in sending order from the cursor.
    #[test]
    fn samples_go_in_sending_order() {
        let mut c = WriteClock::new(4 * SAMPLES);
        assert_eq!(c.place.len() as u64, SAMPLES);
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
        assert_eq!(s.seen as u64, SAMPLES / 2);
        assert!(s.dirty.iter().all(|&a| a >= (SAMPLES / 2) as f32));
        // From the cursor (sample SAMPLES / 2, the (SAMPLES / 4)-th seen), then from the start.
        assert_eq!(s.never_sent[0], (SAMPLES / 4) as f32);
        assert_eq!(s.never_sent[(SAMPLES / 4) as usize], 0.0);
    }

    /// Ten pages a second, ten in the sweep, four seen (one page not in it): the sweep stood at
    /// the fourth 0.1 s
    /// before the read (the read before showed none) and the read was 0.1 s ago, so it has
    /// reached the sixth. The pages not
    /// seen come next, then the first ones seen.
    #[test]
    fn the_sweep_comes_back_in_its_order() {
        let lw = SweepOrder {
            stride: 1.0,
            taken: Duration::from_millis(100),
            never_sent: vec![0.0],
            clean: vec![2.0, 3.0],
            dirty: vec![1.0, f32::NAN],
            head: Head {
                first: 3.0,
                last: 3.0,
                span: 0.0,
                age: 0.1,
            },
            seen: 4,
            speed: 0.0,
        };
        let pages: Vec<_> = lw
            .pages(1.0, 10.0, Duration::from_millis(200), 1, 0.75)
            .collect();
        assert_eq!(pages.len(), 4);
        let (never, clean) = (pages[0], pages[1]);
        // Page at place 0: five places ahead (6, 7, 8, 9, then 0), 0.5 s away.
        assert!(never.written_in(0.0, 0.51) && !never.written_in(0.0, 0.49));
        assert!((never.sent_in - 0.75).abs() < 1e-9);
        assert!(!never.dirtied_by(1.49) && never.dirtied_by(1.51));
        // Place 2: seven ahead, at 0.7 s, then 1.7 s.
        assert!(clean.written_in(0.0, 0.71) && !clean.written_in(0.0, 0.69));
        assert!(clean.written_in(0.71, 1.71) && !clean.written_in(0.71, 1.69));
        assert!(clean.dirtied_by(0.71) && !clean.dirtied_by(0.69));
    }
}
