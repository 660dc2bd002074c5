//! Dirty tracking: which guest pages changed since they were last sent.
//!
//! The KVM backend uses the dirty log with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, every page
//! initially dirty: `KVM_GET_DIRTY_LOG` reads the bits without resetting them, and the worker
//! that sends a page clears (and write-protects) exactly that page with `KVM_CLEAR_DIRTY_LOG`
//! *before* reading it, so a write that races with the read is reported again. Writes the VMM
//! itself makes are not logged by KVM; they are marked in a VMM-side bitmap that every harvest
//! merges. The [`DirtyTracker`] trait is the seam where a dirty-ring backend can be added.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::kvm_clear_dirty_log;
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::bitmap::Bitmap;
use crate::memory::{GuestMemory, PAGE_SHIFT};

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, 0xAE, 0xc0, kvm_clear_dirty_log);

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM_GET_DIRTY_LOG failed on slot {slot}")]
    Get {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG failed on slot {slot} pages {first}+{count}")]
    Clear {
        slot: u32,
        first: u64,
        count: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} starts at page {first_page}, not a multiple of 64 (KVM_CLEAR_DIRTY_LOG needs it)")]
    Unaligned { slot: u32, first_page: u64 },
    #[error("page {page} is not in any memory slot")]
    NoSlot { page: u64 },
}

/// A source of dirty-page information.
pub trait DirtyTracker: Send + Sync {
    /// ORs into `out` (indexed by guest page number) every page written since it was last
    /// cleared.
    fn harvest(&self, out: &mut Bitmap) -> Result<(), DirtyError>;
    /// ORs into `out` the pages the dirty log shows written, leaving every mark where it is
    /// (the VMM's too, which only a harvest takes): a look between harvests, for forecasts.
    fn peek(&self, out: &mut Bitmap) -> Result<(), DirtyError>;
    /// Re-arms tracking for `pages` (ascending page numbers) before they are read for sending.
    fn clear(&self, pages: &[u64]) -> Result<(), DirtyError>;
}

/// Pages the VMM wrote itself, which KVM's dirty log does not see.
pub struct VmmDirty {
    bits: Vec<AtomicU64>,
}

impl VmmDirty {
    /// A bitmap for `pages` pages, all clean.
    pub fn new(pages: u64) -> Self {
        Self {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `[gpa, gpa+len)` as written by the VMM.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = (gpa + len - 1) >> PAGE_SHIFT;
        for p in first..=last {
            if let Some(w) = self.bits.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }

    /// Moves the marks into `out` and clears them.
    pub fn drain_into(&self, out: &mut Bitmap) {
        let words: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect();
        out.or_words(0, &words);
    }
}

struct Slot {
    slot: u32,
    first_page: u64,
    pages: u64,
}

/// KVM's dirty log (manual protect), merged with the VMM-side bitmap.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    vmm: Arc<VmmDirty>,
}

impl KvmDirtyLog {
    /// Tracks every region of `mem`; region `i` is KVM slot `i`.
    pub fn new(vm: Arc<VmFd>, mem: &GuestMemory, vmm: Arc<VmmDirty>) -> Result<Self, DirtyError> {
        let mut slots = Vec::new();
        for (i, r) in mem.regions().iter().enumerate() {
            if r.first_page() % 64 != 0 {
                return Err(DirtyError::Unaligned {
                    slot: i as u32,
                    first_page: r.first_page(),
                });
            }
            slots.push(Slot {
                slot: i as u32,
                first_page: r.first_page(),
                pages: r.pages(),
            });
        }
        Ok(Self { vm, slots, vmm })
    }

    fn slot_of(&self, page: u64) -> Result<&Slot, DirtyError> {
        self.slots
            .iter()
            .find(|s| page >= s.first_page && page < s.first_page + s.pages)
            .ok_or(DirtyError::NoSlot { page })
    }

    fn clear_run(&self, s: &Slot, first_word: u64, words: &[u64]) -> Result<(), DirtyError> {
        let first = first_word * 64;
        let count = ((words.len() as u64) * 64).min(s.pages - first) as u32;
        let arg = kvm_clear_dirty_log {
            slot: s.slot,
            num_pages: count,
            first_page: first,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: `arg` points at `words`, which holds at least `count` bits and lives across
        // the call; `first` is a multiple of 64 and `first + count` does not pass the slot's
        // end, as KVM_CLEAR_DIRTY_LOG requires. The VmFd is a valid KVM VM descriptor.
        let ret = unsafe { ioctl_with_ref(self.vm.as_ref(), KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(DirtyError::Clear {
                slot: s.slot,
                first,
                count,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn harvest(&self, out: &mut Bitmap) -> Result<(), DirtyError> {
        self.peek(out)?;
        self.vmm.drain_into(out);
        Ok(())
    }

    fn peek(&self, out: &mut Bitmap) -> Result<(), DirtyError> {
        // With manual protect, KVM_GET_DIRTY_LOG copies the bits out and resets none.
        for s in &self.slots {
            let bits = self
                .vm
                .get_dirty_log(s.slot, (s.pages as usize) << PAGE_SHIFT)
                .map_err(|source| DirtyError::Get {
                    slot: s.slot,
                    source,
                })?;
            out.or_words((s.first_page / 64) as usize, &bits);
        }
        Ok(())
    }

    fn clear(&self, pages: &[u64]) -> Result<(), DirtyError> {
        // Build runs of consecutive 64-page words inside one slot, one ioctl per run.
        let mut i = 0;
        let mut words: Vec<u64> = Vec::new();
        while i < pages.len() {
            let s = self.slot_of(pages[i])?;
            let first_word = (pages[i] - s.first_page) / 64;
            let mut word = first_word;
            words.clear();
            words.push(0);
            while i < pages.len() {
                let p = pages[i];
                if p < s.first_page || p >= s.first_page + s.pages {
                    break;
                }
                let w = (p - s.first_page) / 64;
                if w != word {
                    if w != word + 1 {
                        break;
                    }
                    word = w;
                    words.push(0);
                }
                *words.last_mut().expect("pushed above") |= 1 << ((p - s.first_page) % 64);
                i += 1;
            }
            self.clear_run(s, first_word, &words)?;
        }
        Ok(())
    }
}
