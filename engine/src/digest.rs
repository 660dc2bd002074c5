//! Proof of equality (DESIGN §4.4): digests of guest memory per range, compared at
//! switchover.
//!
//! A range's digest is the wrapping sum of one term per page, `xxh3(p, xxh3(page))`, and 0
//! for a zero page. A sum does not depend on the order its terms arrive in, so the
//! destination keeps one term per page as it writes pages ([`PageTerms`]) and the source
//! one per page read from its memory while the VM runs ([`LiveTerms`]): at switchover only
//! the pages that may have changed since are hashed, while the last pages travel.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::bitmap::{word_ones, Bitmap};
use crate::memory::{on_threads, GuestMemory, MemoryError, PAGE_SIZE};

/// How much of guest memory is compared at switchover, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Every page (the default: the demo and the tests use it). The source read its terms
    /// from its memory while the VM ran, and hashes at the pause the pages the dirty log
    /// reported or that were re-armed since ([`LiveTerms`]); the destination hashed each
    /// page as it wrote it.
    #[default]
    Full,
    /// Every page, and both sides hash all of their memory at the pause, trusting no log:
    /// it also catches a write the dirty log missed and a stray write on the destination,
    /// and costs both hashes in downtime.
    Reread,
    /// One page in [`SAMPLE_STRIDE`], at an offset that changes with every migration.
    Sample,
    /// No comparison.
    Off,
}

/// With [`VerifyMode::Sample`], one page in this many is hashed.
pub const SAMPLE_STRIDE: u64 = 16;

impl FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "reread" => Ok(Self::Reread),
            "sample" => Ok(Self::Sample),
            "off" => Ok(Self::Off),
            _ => Err(format!(
                "unknown verify mode {s:?} (full, reread, sample, off)"
            )),
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Reread => "reread",
            Self::Sample => "sample",
            Self::Off => "off",
        })
    }
}

impl VerifyMode {
    /// Whether page `p` is compared with this mode and `salt`.
    fn covers(self, p: u64, salt: u64) -> bool {
        match self {
            Self::Full | Self::Reread => true,
            Self::Sample => p % SAMPLE_STRIDE == salt % SAMPLE_STRIDE,
            Self::Off => false,
        }
    }

    /// Share of the pages compared.
    pub fn share(self) -> f64 {
        match self {
            Self::Full | Self::Reread => 1.0,
            Self::Sample => 1.0 / SAMPLE_STRIDE as f64,
            Self::Off => 0.0,
        }
    }
}

/// Page `p`'s term in its range's digest.
pub fn page_term(p: u64, page: &[u8]) -> u64 {
    static ZERO: LazyLock<u64> = LazyLock::new(|| xxh3_64(&[0; PAGE_SIZE]));
    match xxh3_64(page) {
        h if h == *ZERO => 0,
        h => xxh3_64_with_seed(&h.to_le_bytes(), p),
    }
}

/// Work worth a thread of its own at switchover, where starting one costs tens of
/// microseconds: summing the terms of a GiB of guest memory, or hashing 128 pages.
const TERMS_PER_THREAD: usize = 1 << 18;
const HASH_PAGES_PER_THREAD: usize = 128;

/// Sums `range_sum(gpa, len)` over ranges of `range_bytes` (each cut at region ends), on
/// `threads` threads; nothing with `Off`.
fn per_range(
    mem: &GuestMemory,
    mode: VerifyMode,
    range_bytes: u64,
    threads: usize,
    range_sum: impl Fn(u64, u64) -> Result<u64, MemoryError> + Sync,
) -> Result<Vec<u64>, MemoryError> {
    if mode == VerifyMode::Off {
        return Ok(Vec::new());
    }
    let ranges = mem.ranges(range_bytes);
    let mut out = vec![0u64; ranges.len()];
    on_threads(&ranges, &mut out, threads, |&(gpa, len), o| {
        *o = range_sum(gpa, len)?;
        Ok(())
    })?;
    Ok(out)
}

/// Hashes guest memory: the digest of each range of `range_bytes` (cut at region ends), on
/// `threads` threads. With `Sample`, only pages whose index ≡ `salt` (mod SAMPLE_STRIDE).
///
/// # Safety
/// Nothing may write guest memory meanwhile: the vCPUs are paused and no page is being
/// applied.
pub unsafe fn digests(
    mem: &GuestMemory,
    mode: VerifyMode,
    range_bytes: u64,
    salt: u64,
    threads: usize,
) -> Result<Vec<u64>, MemoryError> {
    per_range(mem, mode, range_bytes, threads, |gpa, len| {
        // SAFETY: the caller guarantees that nothing writes guest memory meanwhile.
        let bytes = unsafe { mem.frozen(gpa, len)? };
        let first = gpa / PAGE_SIZE as u64;
        Ok(bytes
            .chunks_exact(PAGE_SIZE)
            .zip(first..)
            .filter(|&(_, p)| mode.covers(p, salt))
            .fold(0u64, |sum, (page, p)| sum.wrapping_add(page_term(p, page))))
    })
}

/// The destination's term of every page as last written, so that its digests need no
/// hashing at switchover. A page never written is zero, and its term 0.
pub struct PageTerms(Vec<AtomicU64>);

impl PageTerms {
    pub fn new(pages: u64) -> Self {
        Self((0..pages).map(|_| AtomicU64::new(0)).collect())
    }

    /// Records what page `p` now holds. Calls for one page must not race each other.
    pub fn set(&self, p: u64, page: &[u8]) {
        self.0[p as usize].store(page_term(p, page), Ordering::Relaxed);
    }

    /// The digests [`digests`] would give for memory laid out as `mem`, holding these pages.
    pub fn digests(
        &self,
        mem: &GuestMemory,
        mode: VerifyMode,
        range_bytes: u64,
        salt: u64,
        threads: usize,
    ) -> Vec<u64> {
        let threads = threads.min(self.0.len().div_ceil(TERMS_PER_THREAD));
        let sums = per_range(mem, mode, range_bytes, threads, |gpa, len| {
            let first = gpa / PAGE_SIZE as u64;
            Ok((first..first + len / PAGE_SIZE as u64)
                .filter(|&p| mode.covers(p, salt))
                .fold(0u64, |sum, p| {
                    sum.wrapping_add(self.0[p as usize].load(Ordering::Relaxed))
                }))
        });
        sums.expect("summing terms reads no guest memory")
    }
}

/// The source's terms of every page, kept while the VM runs, so that at the pause only the
/// pages that may have changed since are hashed (`--verify full`).
///
/// A page's term is read from memory after its stale bit was taken, and everything that can
/// change the page afterwards sets the bit again: a harvest that reports the page (the dirty
/// log keeps a page's bit until it is re-armed) and a worker re-arming it to send it (the
/// only way a bit leaves the log; the worker marks it after re-arming). So, on the dirty
/// log's word, a page whose bit is clear holds what its term was read from; at the pause the
/// pages whose bits are set are hashed from the paused memory. What this trusts is the dirty
/// log itself, not the policy's groups or the transport: a page the policy forgets, or one
/// the destination holds wrong, still differs. `--verify reread` trusts no log: both sides
/// hash all of memory at the pause.
pub struct LiveTerms {
    terms: PageTerms,
    stale: Vec<AtomicU64>,
}

impl LiveTerms {
    /// Terms for the pages of `pages` (every page of guest memory), all of them stale.
    pub fn new(pages: &Bitmap) -> Self {
        Self {
            terms: PageTerms::new(pages.len()),
            stale: pages.words().iter().map(|&w| AtomicU64::new(w)).collect(),
        }
    }

    /// Marks `pages` stale (a worker, once it has re-armed them).
    pub fn mark(&self, pages: &[u64]) {
        for &p in pages {
            self.stale[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    /// Marks stale every page set in `written` (a harvest).
    pub fn mark_written(&self, written: &Bitmap) {
        for (s, &w) in self.stale.iter().zip(written.words()) {
            if w != 0 {
                s.fetch_or(w, Ordering::Release);
            }
        }
    }

    /// Pages stale now.
    pub fn stale_pages(&self) -> u64 {
        self.stale
            .iter()
            .map(|s| u64::from(s.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Hashes the stale pages that `wanted` (a mask per word of 64 pages) lets through,
    /// reading memory while the VM runs, and returns how many. One caller at a time.
    pub fn sweep(
        &self,
        mem: &GuestMemory,
        wanted: impl Fn(usize) -> u64,
    ) -> Result<u64, MemoryError> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut hashed = 0;
        for (wi, s) in self.stale.iter().enumerate() {
            let want = wanted(wi);
            if s.load(Ordering::Relaxed) & want == 0 {
                continue;
            }
            // Taken before the read: a write after the take sets the bit again.
            let taken = s.fetch_and(!want, Ordering::AcqRel) & want;
            for p in word_ones(wi, taken) {
                mem.read(p * PAGE_SIZE as u64, &mut buf)?;
                self.terms.set(p, &buf);
                hashed += 1;
            }
        }
        Ok(hashed)
    }

    /// Hashes the pages still stale on `threads` threads and returns the digests (as
    /// [`digests`] gives them for `Full`) and how many pages it hashed.
    ///
    /// # Safety
    /// As [`digests`]: nothing writes guest memory meanwhile.
    pub unsafe fn finish(
        &self,
        mem: &GuestMemory,
        range_bytes: u64,
        threads: usize,
    ) -> Result<(Vec<u64>, u64), MemoryError> {
        let pages: Vec<u64> = self
            .stale
            .iter()
            .enumerate()
            .flat_map(|(wi, s)| word_ones(wi, s.swap(0, Ordering::AcqRel)))
            .collect();
        let threads = threads.min(pages.len().div_ceil(HASH_PAGES_PER_THREAD));
        on_threads(&pages, &mut vec![(); pages.len()], threads, |&p, ()| {
            // SAFETY: the caller guarantees that nothing writes guest memory.
            let page = unsafe { mem.frozen(p * PAGE_SIZE as u64, PAGE_SIZE as u64)? };
            self.terms.set(p, page);
            Ok(())
        })?;
        let digests = self
            .terms
            .digests(mem, VerifyMode::Full, range_bytes, 0, threads);
        Ok((digests, pages.len() as u64))
    }
}

/// Indices of the ranges whose digests differ (all of them if the counts differ).
pub fn mismatches(a: &[u64], b: &[u64]) -> Vec<usize> {
    if a.len() != b.len() {
        return (0..a.len().max(b.len())).collect();
    }
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Digests of `m`, which the test alone writes.
    fn hashed(m: &GuestMemory, mode: VerifyMode, range: u64, salt: u64) -> Vec<u64> {
        // SAFETY: no VM runs over `m` and this thread is the only writer.
        unsafe { digests(m, mode, range, salt, 2) }.unwrap()
    }

    #[test]
    fn digests_see_a_one_byte_change() {
        let m = GuestMemory::new(&[(0, 8 << 20), (16 << 20, 4 << 20)]).unwrap();
        let a = hashed(&m, VerifyMode::Full, 1 << 20, 0);
        assert_eq!(a.len(), 12);
        m.write(17 << 20, &[1]).unwrap();
        let b = hashed(&m, VerifyMode::Full, 1 << 20, 0);
        assert_eq!(mismatches(&a, &b), vec![9]);
        let s1 = hashed(&m, VerifyMode::Sample, 1 << 20, 0);
        // Page (17 MiB / 4 KiB) = 4352 ≡ 0 (mod 16): sampled with salt 0, not with salt 1.
        m.write(17 << 20, &[2]).unwrap();
        assert_eq!(
            mismatches(&s1, &hashed(&m, VerifyMode::Sample, 1 << 20, 0)),
            vec![9]
        );
        m.write(17 << 20, &[3]).unwrap();
        let s2 = hashed(&m, VerifyMode::Sample, 1 << 20, 1);
        m.write(17 << 20, &[4]).unwrap();
        assert!(mismatches(&s2, &hashed(&m, VerifyMode::Sample, 1 << 20, 1)).is_empty());
        assert!(hashed(&m, VerifyMode::Off, 1 << 20, 0).is_empty());
    }

    #[test]
    fn digests_see_two_pages_swapped() {
        let m = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        m.write(0, &[1]).unwrap();
        m.write(PAGE_SIZE as u64, &[2]).unwrap();
        let a = hashed(&m, VerifyMode::Full, 1 << 20, 0);
        m.write(0, &[2]).unwrap();
        m.write(PAGE_SIZE as u64, &[1]).unwrap();
        assert_eq!(
            mismatches(&a, &hashed(&m, VerifyMode::Full, 1 << 20, 0)),
            vec![0]
        );
    }

    /// What a live VM does to one page, for [`LiveTerms`]: the dirty log keeps a page's bit
    /// from the write until a worker re-arms it.
    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, u8),
        Harvest,
        /// A worker re-arms the page (then reads and sends it).
        Send(u64),
        /// A sweep over the pages whose index has this bit clear.
        Sweep(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..96, any::<u8>()).prop_map(|(p, b)| Op::Write(p, b)),
            1 => Just(Op::Harvest),
            3 => (0u64..96).prop_map(Op::Send),
            2 => (0u8..3).prop_map(Op::Sweep),
        ]
    }

    #[test]
    fn live_terms_hash_at_the_end_only_what_the_sweeps_left() {
        let m = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        m.write(5 * PAGE_SIZE as u64, &[7]).unwrap();
        let t = LiveTerms::new(&Bitmap::full(256));
        assert_eq!(t.stale_pages(), 256);
        // The first word's 64 pages only.
        assert_eq!(
            t.sweep(&m, |i| if i == 0 { u64::MAX } else { 0 }).unwrap(),
            64
        );
        assert_eq!(t.stale_pages(), 192);
        t.mark(&[5]);
        // SAFETY: no VM runs over `m`.
        let (d, pages) = unsafe { t.finish(&m, 1 << 20, 2) }.unwrap();
        assert_eq!(pages, 193);
        assert_eq!(d, hashed(&m, VerifyMode::Full, 1 << 20, 0));
        assert_eq!(t.stale_pages(), 0);
    }

    proptest! {
        /// Whatever the order of writes, harvests, sends and sweeps, the terms give the
        /// digests of memory at the end, as long as the dirty log saw every write.
        #[test]
        fn live_terms_follow_the_dirty_log(
            ops in prop::collection::vec(op(), 1..300),
        ) {
            let m = GuestMemory::new(&[(0, 256 << 10), (1 << 20, 128 << 10)]).unwrap();
            let pages: Vec<u64> = m
                .regions()
                .iter()
                .flat_map(|r| r.first_page()..r.first_page() + r.pages())
                .collect();
            let mut all = Bitmap::new(m.page_span());
            for &p in &pages {
                all.set(p);
            }
            let t = LiveTerms::new(&all);
            let mut log = Bitmap::new(m.page_span());
            for op in ops {
                match op {
                    Op::Write(i, b) => {
                        let p = pages[i as usize];
                        m.write(p * PAGE_SIZE as u64 + u64::from(b), &[b | 1]).unwrap();
                        log.set(p);
                    }
                    Op::Harvest => t.mark_written(&log),
                    Op::Send(i) => {
                        let p = pages[i as usize];
                        log.clear(p);
                        t.mark(&[p]);
                    }
                    Op::Sweep(bit) => {
                        let mask = !0x5555_5555_5555_5555u64.rotate_left(u32::from(bit));
                        t.sweep(&m, |_| mask).unwrap();
                    }
                }
            }
            // The pause: the last harvest, then what is still stale.
            t.mark_written(&log);
            // SAFETY: no VM runs over `m`.
            let (d, _) = unsafe { t.finish(&m, 1 << 16, 2) }.unwrap();
            prop_assert_eq!(d, hashed(&m, VerifyMode::Full, 1 << 16, 0));
        }

        /// Terms kept as pages are written, in any order and again, give the digests of
        /// the memory they were written to.
        #[test]
        fn page_terms_give_the_digests_of_memory(
            writes in prop::collection::vec((0u64..96, 0u8..4), 1..200),
            salt in any::<u64>(),
        ) {
            let m = GuestMemory::new(&[(0, 256 << 10), (1 << 20, 128 << 10)]).unwrap();
            let terms = PageTerms::new(m.page_span());
            let pages: Vec<u64> = m
                .regions()
                .iter()
                .flat_map(|r| r.first_page()..r.first_page() + r.pages())
                .collect();
            for (i, fill) in writes {
                let p = pages[i as usize];
                // Fill 0 is a zero page written over whatever was there.
                let page = [fill.wrapping_mul(p as u8 | 1); PAGE_SIZE];
                m.write(p * PAGE_SIZE as u64, &page).unwrap();
                terms.set(p, &page);
            }
            for mode in [VerifyMode::Full, VerifyMode::Sample, VerifyMode::Off] {
                prop_assert_eq!(terms.digests(&m, mode, 1 << 16, salt, 2), hashed(&m, mode, 1 << 16, salt));
            }
        }
    }
}
