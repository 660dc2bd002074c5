//! Guest memory: one or more regions of private anonymous memory in this process, each a
//! KVM memory slot.
//!
//! Guest memory is written by running vCPUs while ferry reads it, so it is never exposed as a
//! Rust slice: every access is a raw-pointer copy into or out of a buffer the caller owns
//! (STYLE 11). The one exception is [`GuestMemory::frozen`], for hashing memory that nothing
//! writes (a paused VM), where the copy would cost a third of the time. Addresses are
//! guest-physical (`gpa`) and checked against the region map before any copy.

use memmap2::{MmapOptions, MmapRaw};

/// Size of a guest page. ferry tracks, sends and verifies memory at this granularity.
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// Errors from guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mapping a region of {len} bytes
    #[error("mapping a region of {len} bytes")]
    Map {
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest range gpa={gpa:#x} len={len:#x} is outside guest memory")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("region layout is invalid: {0}")]
    Layout(String),
    #[error("allocating {len} bytes of guest memory at gpa={gpa:#x}")]
    Populate {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// [`GuestMemory::populate`] allocates memory in pieces of this many bytes.
const POPULATE_CHUNK: u64 = 64 << 20;

/// One contiguous region of guest-physical memory.
pub struct Region {
    gpa: u64,
    len: u64,
    map: MmapRaw,
}

impl Region {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty (never true for a constructed region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Host virtual address of the first byte, for `KVM_SET_USER_MEMORY_REGION`.
    pub fn host_addr(&self) -> u64 {
        self.map.as_mut_ptr() as u64
    }
    /// Index of this region's first page among all guest pages.
    pub fn first_page(&self) -> u64 {
        self.gpa >> PAGE_SHIFT
    }
    /// Number of pages in this region.
    pub fn pages(&self) -> u64 {
        self.len >> PAGE_SHIFT
    }
}

/// Layout of guest memory: `(gpa, len)` of each region, sorted, page aligned, disjoint.
pub type Layout = Vec<(u64, u64)>;

/// Guest memory made of anonymous regions.
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    /// Maps fresh, zero-filled regions for `layout`.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(layout.len());
        let mut end = 0u64;
        for &(gpa, len) in layout {
            if len == 0 || gpa % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
                return Err(MemoryError::Layout(format!(
                    "region gpa={gpa:#x} len={len:#x} is empty or not page aligned"
                )));
            }
            if gpa < end {
                return Err(MemoryError::Layout(format!(
                    "region gpa={gpa:#x} overlaps or precedes the previous one"
                )));
            }
            end = gpa
                .checked_add(len)
                .ok_or_else(|| MemoryError::Layout("region end overflows".into()))?;
            regions.push(Region::new(gpa, len)?);
        }
        if regions.is_empty() {
            return Err(MemoryError::Layout("no regions".into()));
        }
        Ok(Self { regions })
    }

    /// A layout of `total` bytes starting at gpa 0, split in regions of at most `max_region`.
    pub fn simple_layout(total: u64, max_region: u64) -> Layout {
        let mut out = Vec::new();
        let mut gpa = 0;
        while gpa < total {
            let len = max_region.min(total - gpa);
            out.push((gpa, len));
            gpa += len;
        }
        out
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The layout these regions were made from.
    pub fn layout(&self) -> Layout {
        self.regions.iter().map(|r| (r.gpa, r.len)).collect()
    }

    /// Total bytes of guest memory.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Highest guest page number + 1 (pages between regions count as holes).
    pub fn page_span(&self) -> u64 {
        self.regions
            .last()
            .map(|r| (r.gpa + r.len) >> PAGE_SHIFT)
            .unwrap_or(0)
    }

    /// Host pointer for `len` bytes at `gpa`, if the whole range lies inside one region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        let off = gpa - r.gpa;
        if len > r.len - off {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        // SAFETY: `off < r.len` was checked above, so the pointer stays inside the mapping.
        Ok(unsafe { r.map.as_mut_ptr().add(off as usize) })
    }

    /// Guest memory at `gpa` as a slice, without copying.
    ///
    /// # Safety
    /// Nothing may write `[gpa, gpa+len)` while the slice lives: no vCPU runs and no page is
    /// being written into guest memory.
    pub unsafe fn frozen(&self, gpa: u64, len: u64) -> Result<&[u8], MemoryError> {
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: `host_ptr` checked that `len` bytes at `p` are mapped for as long as `self`
        // lives; the caller guarantees that nothing writes them meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    /// Whether `[gpa, gpa+len)` lies entirely inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.host_ptr(gpa, len).is_ok()
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.host_ptr(gpa, buf.len() as u64)?;
        // SAFETY: `host_ptr` checked that `buf.len()` bytes at `p` are mapped; `buf` is
        // caller-owned and cannot overlap the guest mapping. A vCPU may write concurrently:
        // the copy then holds a mix of old and new bytes, which dirty tracking resends.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let p = self.host_ptr(gpa, data.len() as u64)?;
        // SAFETY: `host_ptr` checked that `data.len()` bytes at `p` are mapped; `data` is
        // caller-owned and cannot overlap the guest mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with zero.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let p = self.host_ptr(gpa, len)?;
        // SAFETY: `host_ptr` checked that `len` bytes at `p` are mapped.
        unsafe { std::ptr::write_bytes(p, 0, len as usize) };
        Ok(())
    }

    /// Allocates every page now, on up to `threads` threads, leaving the contents as they
    /// are: a host short of memory fails here rather than midway through a migration, and the
    /// first write to each page (a fault and a zeroing by the kernel) is not paid while pages
    /// arrive. With `MADV_POPULATE_WRITE` (Linux 5.14), else by an atomic write of a word of
    /// each page with its own value, which cannot lose a concurrent write.
    pub fn populate(&self, threads: usize) -> Result<(), MemoryError> {
        let pieces = self.ranges(POPULATE_CHUNK);
        on_threads(
            &pieces,
            &mut vec![(); pieces.len()],
            threads,
            |&(gpa, len), ()| {
                let p = self.host_ptr(gpa, len)?;
                populate(p, len).map_err(|source| MemoryError::Populate { gpa, len, source })
            },
        )
    }

    /// Guest memory as `(gpa, len)` ranges of `bytes` (whole pages, at least one), each cut at
    /// its region's end.
    pub fn ranges(&self, bytes: u64) -> Vec<(u64, u64)> {
        let bytes = bytes.max(PAGE_SIZE as u64) / PAGE_SIZE as u64 * PAGE_SIZE as u64;
        self.regions
            .iter()
            .flat_map(|r| {
                (0..r.len)
                    .step_by(bytes as usize)
                    .map(move |off| (r.gpa + off, bytes.min(r.len - off)))
            })
            .collect()
    }

    /// Bytes of guest memory allocated in this process: all of it after
    /// [`GuestMemory::populate`], else what was written so far. Counted in
    /// `/proc/self/pagemap` as pages present and mapped only here, which, unlike
    /// `mincore(2)`, leaves out pages only read (mapped to the kernel's shared zero page).
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        const PRESENT: u64 = 1 << 63;
        const EXCLUSIVE: u64 = 1 << 56;
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut n = 0;
        for r in &self.regions {
            let mut entries = vec![0u8; r.pages() as usize * 8];
            let at = r.host_addr() / PAGE_SIZE as u64 * 8;
            std::os::unix::fs::FileExt::read_exact_at(&pagemap, &mut entries, at)?;
            n += entries
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                .filter(|&e| e & (PRESENT | EXCLUSIVE) == PRESENT | EXCLUSIVE)
                .count() as u64;
        }
        Ok(n * PAGE_SIZE as u64)
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64 at `gpa`.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl Region {
    fn new(gpa: u64, len: u64) -> Result<Self, MemoryError> {
        // Private anonymous memory, as QEMU uses by default: a page never written reads as
        // the kernel's zero page without being allocated (a memfd allocates it on a read).
        // Transparent huge pages are left to the system: here they made first writes on the
        // destination slower, not faster.
        let map = MmapOptions::new()
            .len(len as usize)
            .map_anon()
            .map_err(|source| MemoryError::Map { len, source })?;
        Ok(Self {
            gpa,
            len,
            map: map.into(),
        })
    }
}

/// Calls `f` on each item and its output, on `threads` threads, each taking one contiguous
/// share of both; on the calling thread when one would do.
pub(crate) fn on_threads<T: Sync, O: Send>(
    items: &[T],
    outs: &mut [O],
    threads: usize,
    f: impl Fn(&T, &mut O) -> Result<(), MemoryError> + Sync,
) -> Result<(), MemoryError> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    if per >= items.len() {
        return items.iter().zip(outs).try_for_each(|(i, o)| f(i, o));
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .zip(outs.chunks_mut(per))
            .map(|(is, os)| {
                crate::threads::spawn(s, move || is.iter().zip(os).try_for_each(|(i, o)| f(i, o)))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a thread over guest memory panicked"))
    })
}

/// Allocates the `len` bytes of mapped guest memory at `p` (see [`GuestMemory::populate`]).
fn populate(p: *mut u8, len: u64) -> std::io::Result<()> {
    // SAFETY: `p..p+len` is mapped guest memory; MADV_POPULATE_WRITE only faults its pages in
    // as a write would, without changing their contents.
    if unsafe { libc::madvise(p.cast(), len as usize, libc::MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // An older kernel.
    touch(p, len);
    Ok(())
}

/// A write fault on each page of the `len` bytes of mapped guest memory at `p` that leaves it
/// as it is.
fn touch(p: *mut u8, len: u64) {
    for off in (0..len as usize).step_by(PAGE_SIZE) {
        // SAFETY: the page is mapped and page aligned, so the word is in bounds and aligned;
        // guest memory is only ever accessed by raw-pointer copies, never through a reference.
        let word = unsafe { std::sync::atomic::AtomicU64::from_ptr(p.add(off).cast()) };
        // A compare-exchange of the word with itself: a write the compiler keeps (an add of
        // zero may become a load, which would map the shared zero page instead).
        let mut v = word.load(std::sync::atomic::Ordering::Relaxed);
        while let Err(now) = word.compare_exchange_weak(
            v,
            v,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        ) {
            v = now;
        }
    }
}

// SAFETY: the mapping is accessed only through raw-pointer copies (and `frozen`, whose caller
// guarantees no writer); moving or sharing the handle between threads is as safe as sharing
// the mapping with vCPU threads.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no safe method hands out references into the mapping.
unsafe impl Sync for GuestMemory {}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(m: &GuestMemory) -> usize {
        (m.allocated_bytes().unwrap() / PAGE_SIZE as u64) as usize
    }

    /// Work for one thread runs on the calling one (no thread is started in the downtime for
    /// a few pages); more is split over as many threads as asked, each item done once.
    #[test]
    fn on_threads_starts_threads_only_for_shares_of_their_own() {
        let here = std::thread::current().id();
        let run = |n: usize, threads: usize| {
            let items: Vec<usize> = (0..n).collect();
            let mut outs = vec![None; n];
            on_threads(&items, &mut outs, threads, |&i, o| {
                *o = Some((i, std::thread::current().id()));
                Ok(())
            })
            .unwrap();
            outs.into_iter().map(Option::unwrap).collect::<Vec<_>>()
        };
        for (n, threads) in [(5, 1), (1, 4), (0, 2)] {
            let outs = run(n, threads);
            assert_eq!(outs.len(), n);
            assert!(outs
                .iter()
                .enumerate()
                .all(|(k, &(i, t))| i == k && t == here));
        }
        let outs = run(6, 3);
        assert!(outs.iter().enumerate().all(|(k, &(i, _))| i == k));
        let ids: std::collections::HashSet<_> = outs.iter().map(|&(_, t)| t).collect();
        assert_eq!(ids.len(), 3);
        assert!(!ids.contains(&here));
    }

    /// Every page is allocated, over several pieces and threads, and what was written stays.
    #[test]
    fn populate_allocates_every_page_and_keeps_contents() {
        let m =
            GuestMemory::new(&[(0, 3 << 20), (8 << 20, 2 * POPULATE_CHUNK + (1 << 20))]).unwrap();
        let pages = (m.size() / PAGE_SIZE as u64) as usize;
        m.write_u64(4096, 0xfeed).unwrap();
        m.write_u64((8 << 20) + POPULATE_CHUNK + 8, 0xbeef).unwrap();
        // Reading maps the shared zero page; only writing allocates.
        let mut all = vec![0u8; 3 << 20];
        m.read(0, &mut all).unwrap();
        assert!(
            resident(&m) < pages / 100,
            "fresh memory, written in two pages and read in 768, is not allocated yet"
        );
        m.populate(3).unwrap();
        assert_eq!(resident(&m), pages);
        assert_eq!(m.read_u64(4096).unwrap(), 0xfeed);
        assert_eq!(m.read_u64((8 << 20) + POPULATE_CHUNK + 8).unwrap(), 0xbeef);
        assert_eq!(m.read_u64(8192).unwrap(), 0);
    }

    /// The fallback for kernels without `MADV_POPULATE_WRITE` allocates the pages too.
    #[test]
    fn touching_allocates_pages_and_keeps_contents() {
        let m = GuestMemory::new(&[(0, 4 << 20)]).unwrap();
        m.write_u64(PAGE_SIZE as u64 * 3, 7).unwrap();
        let r = &m.regions()[0];
        touch(r.host_addr() as *mut u8, r.len());
        assert_eq!(resident(&m), r.pages() as usize);
        assert_eq!(m.read_u64(PAGE_SIZE as u64 * 3).unwrap(), 7);
    }

    #[test]
    fn bounds_are_checked() {
        let m = GuestMemory::new(&[(0, 1 << 20), (2 << 20, 1 << 20)]).unwrap();
        assert!(m.contains(0, 4096));
        assert!(!m.contains(1 << 20, 1));
        assert!(!m.contains((1 << 20) - 1, 2));
        assert!(m.contains(2 << 20, 1 << 20));
        assert!(!m.contains(3 << 20, 1));
        m.write_u64(0x1000, 0xdead_beef).unwrap();
        assert_eq!(m.read_u64(0x1000).unwrap(), 0xdead_beef);
        assert!(matches!(
            m.write(3 << 20, &[1]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert_eq!(m.page_span(), 768);
        assert!(GuestMemory::new(&[(0, 4096), (0, 4096)]).is_err());
        assert!(GuestMemory::new(&[(0, 100)]).is_err());
    }
}
