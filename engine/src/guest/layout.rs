//! Where everything lives in guest-physical memory, and the vCPU state at boot.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

use super::GuestError;
use crate::memory::{PAGE_SHIFT, PAGE_SIZE};

/// Guest-physical address of the descriptor page: the GDT at its start, the GDTR and IDTR
/// pseudo-descriptors at `GDTR_GPA` and `IDTR_GPA`, the IDT at `IDT_GPA`.
pub const DESC_GPA: u64 = 0x1000;
/// The GDT: null, 64-bit code (selector 0x08), data (selector 0x10), as the boot segments.
pub const GDT_GPA: u64 = DESC_GPA;
/// GDTR pseudo-descriptor (`u16` limit, `u64` base) for `lgdt`.
pub const GDTR_GPA: u64 = DESC_GPA + 0x40;
/// IDTR pseudo-descriptor for `lidt`.
pub const IDTR_GPA: u64 = DESC_GPA + 0x50;
/// The IDT: [`IDT_VECTORS`] 16-byte gates; only the timer and spurious vectors are present.
pub const IDT_GPA: u64 = DESC_GPA + 0x800;
/// Gates in the IDT (vectors `0..IDT_VECTORS`).
pub const IDT_VECTORS: u64 = 128;
/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0x7f;
/// Guest-physical address of the parameter block (one page).
pub const PARAM_GPA: u64 = 0x2000;
/// Guest-physical address of the first per-vCPU block (inside the parameter page).
pub const VCPU_BLOCKS_GPA: u64 = PARAM_GPA + 0x100;
/// Size of one per-vCPU block.
pub const VCPU_BLOCK_SIZE: u64 = 0x40;
/// Guest-physical address of the PML4 (the value of CR3).
pub const PML4_GPA: u64 = 0x3000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x4000;
/// Guest-physical address of the first page directory (one per GiB of memory).
pub const PD_GPA: u64 = 0x5000;
/// Base of the stacks: vCPU `i`'s stack occupies `[STACKS_GPA + i*4K, STACKS_GPA + (i+1)*4K)`.
pub const STACKS_GPA: u64 = 0x5_0000;
/// Guest-physical address of the code, and the entry point.
pub const CODE_GPA: u64 = 0x10_0000;
/// Guest-physical address of the ledger (one `u32` per data page).
pub const LEDGER_GPA: u64 = 0x20_0000;
/// The XOR pattern of a page header's first word, `h0 = gpa ^ HEADER_SIG`: the ASCII of
/// "FERRYPAG", most significant byte first.
pub const HEADER_SIG: u64 = 0x4645_5252_5950_4147;
/// Magic of the parameter block.
pub const PARAM_MAGIC: [u8; 8] = *b"FERRYGST";

/// Smallest guest memory the layout supports.
pub const MIN_MEM_BYTES: u64 = 64 << 20;
/// Largest guest memory the layout supports (64 page directories fit below the stacks).
pub const MAX_MEM_BYTES: u64 = 64 << 30;
/// Most vCPUs: the per-vCPU blocks share the parameter page with the global fields
/// (`(0x1000 - 0x100) / 0x40 = 60`), although the stack area has room for 64.
pub const MAX_VCPUS: u32 = 60;

const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Offsets of the global fields of the parameter block (each a little-endian u64).
pub(crate) mod param {
    pub const MAGIC: u64 = 0x00;
    pub const WORKLOAD: u64 = 0x08;
    pub const DATA_START: u64 = 0x10;
    pub const DATA_PAGES: u64 = 0x18;
    pub const LEDGER: u64 = 0x20;
    pub const WSS_PAGES: u64 = 0x28;
    pub const RATE: u64 = 0x30;
    pub const TSC_KHZ: u64 = 0x38;
    pub const NVCPUS: u64 = 0x40;
    pub const REPORT_TICKS: u64 = 0x48;
    pub const HOT_PAGES: u64 = 0x50;
    pub const SEED: u64 = 0x58;
    pub const TIMER_COUNT: u64 = 0x60;
}

/// Offsets of the fields of a per-vCPU block (each a little-endian u64).
pub(crate) mod vcpu_block {
    /// Index (among data pages) of the first page of the vCPU's share. Written by the VMM.
    pub const FIRST_PAGE: u64 = 0x00;
    /// Pages in the share. Written by the VMM.
    pub const PAGES: u64 = 0x08;
    /// Page writes done (guest-maintained).
    pub const WRITES: u64 = 0x10;
    /// Self-check failures (guest-maintained).
    pub const FAILS: u64 = 0x18;
    /// Page verifications done (guest-maintained).
    pub const CHECKS: u64 = 0x20;
    /// Report lines printed (guest-maintained).
    pub const REPORTS: u64 = 0x28;
    /// The vCPU's index, stored by the guest at boot (for its messages).
    pub const INDEX: u64 = 0x30;
    /// Timer interrupts taken (guest-maintained).
    pub const WAKES: u64 = 0x38;
}

/// A vCPU's share of the data pages, as indices among data pages (`0..data_pages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// First data page index of the share.
    pub first_page: u64,
    /// Number of pages in the share.
    pub pages: u64,
}

/// Where the guest program keeps its parameters, page tables, code, stacks, ledger and data
/// pages, for a memory of a given size (contiguous from gpa 0) and a number of vCPUs.
///
/// ```text
/// 0x1000            descriptor page: GDT at 0x1000, GDTR at 0x1040, IDTR at 0x1050, IDT
///                   (vectors 0..128, timer 0x20, spurious 0x7f) at 0x1800; shared by the vCPUs
/// 0x2000            parameter block (global fields, then one 0x40-byte block per vCPU at 0x2100)
/// 0x3000            PML4        0x4000 PDPT        0x5000.. page directories (2 MiB pages)
/// 0x50000..         stacks, vCPU i's top at 0x50000 + (i+1)*0x1000
/// 0x100000          code (entry point; RDI = vCPU index)
/// 0x200000          ledger: one u32 write counter per data page
/// data_start..end   data pages (from the ledger's end rounded up to 2 MiB), split evenly
///                   into one contiguous share per vCPU
/// ```
///
/// The parameter block (little-endian u64 fields): `0x00` magic `FERRYGST`, `0x08` workload
/// code (0 idle, 1 dirty-all, 2 seq, 3 random, 4 hotcold), `0x10` data start, `0x18` data
/// pages, `0x20` ledger gpa, `0x28` working-set pages per vCPU, `0x30` rate (steps per second
/// per vCPU, 0 = unlimited), `0x38` TSC kHz, `0x40` vCPUs, `0x48` report interval in TSC
/// ticks, `0x50` hot pages per vCPU, `0x58` seed, `0x60` local APIC timer period in APIC
/// bus cycles (0 = never sleep). vCPU `i`'s block at `0x2100 + i*0x40`:
/// `0x00` first data page index of its share and `0x08` its pages (written by the VMM);
/// `0x10` writes, `0x18` self-check failures, `0x20` checks, `0x28` reports printed,
/// `0x30` its index and `0x38` timer interrupts taken (written by the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLayout {
    mem_bytes: u64,
    data_start: u64,
    data_pages: u64,
    shares: Vec<Share>,
}

impl GuestLayout {
    /// Computes the layout for `mem_bytes` of memory (a multiple of 4 KiB, between 64 MiB and
    /// 64 GiB) and `vcpus` vCPUs (1 to [`MAX_VCPUS`]).
    pub fn new(mem_bytes: u64, vcpus: u32) -> Result<Self, GuestError> {
        if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&mem_bytes)
            || mem_bytes % PAGE_SIZE as u64 != 0
        {
            return Err(GuestError::MemorySize { bytes: mem_bytes });
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(GuestError::VcpuCount { vcpus });
        }
        // The ledger's size depends on the number of data pages, which depends on where the
        // data starts: start from an upper bound (data right after a 2 MiB ledger area) and
        // shrink once; the ledger computed for the bound is large enough for the result.
        let bound = (mem_bytes - LEDGER_GPA - HUGE_PAGE) >> PAGE_SHIFT;
        let data_start = (LEDGER_GPA + bound * 4).next_multiple_of(HUGE_PAGE);
        let data_pages = (mem_bytes - data_start) >> PAGE_SHIFT;
        let n = u64::from(vcpus);
        let (base, extra) = (data_pages / n, data_pages % n);
        let mut shares = Vec::with_capacity(vcpus as usize);
        let mut first = 0;
        for i in 0..n {
            let pages = base + u64::from(i < extra);
            shares.push(Share {
                first_page: first,
                pages,
            });
            first += pages;
        }
        Ok(Self {
            mem_bytes,
            data_start,
            data_pages,
            shares,
        })
    }

    /// Bytes of guest memory.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }
    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.shares.len() as u32
    }
    /// Entry point (RIP at boot).
    pub fn entry(&self) -> u64 {
        CODE_GPA
    }
    /// CR3 at boot (the PML4).
    pub fn cr3(&self) -> u64 {
        PML4_GPA
    }
    /// Initial stack pointer of vCPU `vcpu`.
    pub fn stack_top(&self, vcpu: u32) -> u64 {
        STACKS_GPA + (u64::from(vcpu) + 1) * PAGE_SIZE as u64
    }
    /// The parameter block's address.
    pub fn param_gpa(&self) -> u64 {
        PARAM_GPA
    }
    /// The per-vCPU block of `vcpu`.
    pub fn vcpu_block_gpa(&self, vcpu: u32) -> u64 {
        VCPU_BLOCKS_GPA + u64::from(vcpu) * VCPU_BLOCK_SIZE
    }
    /// The ledger's address.
    pub fn ledger_gpa(&self) -> u64 {
        LEDGER_GPA
    }
    /// Address of the ledger entry of data page `page`.
    pub fn ledger_entry_gpa(&self, page: u64) -> u64 {
        LEDGER_GPA + page * 4
    }
    /// Bytes of ledger in use (4 per data page).
    pub fn ledger_bytes(&self) -> u64 {
        self.data_pages * 4
    }
    /// Address of the first data page (2 MiB aligned).
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// Number of data pages.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }
    /// Address of data page `page` (an index among data pages).
    pub fn data_page_gpa(&self, page: u64) -> u64 {
        self.data_start + (page << PAGE_SHIFT)
    }
    /// Every vCPU's share of the data pages.
    pub fn shares(&self) -> &[Share] {
        &self.shares
    }
    /// The vCPU whose share holds data page `page`.
    pub fn owner(&self, page: u64) -> Option<u32> {
        let i = self
            .shares
            .partition_point(|s| s.first_page + s.pages <= page);
        (i < self.shares.len() && page < self.data_pages).then_some(i as u32)
    }
    /// Number of page directories (one per GiB, rounded up).
    pub(crate) fn page_directories(&self) -> u64 {
        self.mem_bytes.div_ceil(GIB)
    }
    /// Number of 2 MiB pages mapped (memory rounded up to 2 MiB).
    pub(crate) fn huge_pages(&self) -> u64 {
        self.mem_bytes.div_ceil(HUGE_PAGE)
    }

    /// The register state vCPU `vcpu` boots with.
    pub fn boot_state(&self, vcpu: u32) -> BootState {
        BootState {
            vcpu,
            rip: self.entry(),
            rsp: self.stack_top(vcpu),
            rdi: u64::from(vcpu),
            cr3: self.cr3(),
        }
    }
}

/// The state a vCPU boots the guest program with: 64-bit long mode, paging through the
/// identity map at [`GuestLayout::cr3`], flat segments, interrupts off, RIP at the entry
/// point, RSP at the vCPU's stack top and RDI holding its index.
///
/// Use [`BootState::regs`] for `KVM_SET_REGS`, and [`BootState::apply_sregs`] on the
/// vCPU's own `KVM_GET_SREGS` result (which keeps KVM's TR/LDT/APIC base) for
/// `KVM_SET_SREGS`; [`BootState::sregs`] builds the same from KVM's reset state without a
/// vCPU at hand. With an in-kernel irqchip, vCPUs other than 0 start waiting for a SIPI:
/// set their MP state to `KVM_MP_STATE_RUNNABLE` too (or use [`BootState::configure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    /// vCPU index.
    pub vcpu: u32,
    /// Entry point.
    pub rip: u64,
    /// Stack top.
    pub rsp: u64,
    /// vCPU index, the program's only argument.
    pub rdi: u64,
    /// Page table root.
    pub cr3: u64,
}

/// CR0: protection, extension type (FPU present), paging.
const CR0_BOOT: u64 = 0x1 | 0x10 | 0x8000_0000;
/// CR4: physical address extension.
const CR4_BOOT: u64 = 0x20;
/// EFER: long mode enable and active.
const EFER_BOOT: u64 = 0x100 | 0x400;
/// RFLAGS: only the reserved bit 1 (interrupts off).
const RFLAGS_BOOT: u64 = 0x2;

impl BootState {
    /// General-purpose registers at boot.
    pub fn regs(&self) -> kvm_regs {
        kvm_regs {
            rip: self.rip,
            rsp: self.rsp,
            rdi: self.rdi,
            rflags: RFLAGS_BOOT,
            ..Default::default()
        }
    }

    /// Turns `sregs` (a vCPU's current special registers) into the boot state: long mode,
    /// CR3, flat 64-bit code and data segments. TR, LDT, descriptor tables and the APIC base
    /// are kept.
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 = CR0_BOOT;
        sregs.cr3 = self.cr3;
        sregs.cr4 = CR4_BOOT;
        sregs.efer = EFER_BOOT;
    }

    /// The boot special registers built from KVM's x86 reset state (TR a busy 32-bit TSS,
    /// LDT present, descriptor table limits 0xffff, the APIC enabled at 0xfee00000 and
    /// marked BSP on vCPU 0), with [`BootState::apply_sregs`] applied.
    pub fn sregs(&self) -> kvm_sregs {
        let tr = kvm_segment {
            limit: 0xffff,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        let ldt = kvm_segment {
            limit: 0xffff,
            type_: 2,
            present: 1,
            ..Default::default()
        };
        let mut s = kvm_sregs {
            tr,
            ldt,
            gdt: kvm_bindings::kvm_dtable {
                limit: 0xffff,
                ..Default::default()
            },
            idt: kvm_bindings::kvm_dtable {
                limit: 0xffff,
                ..Default::default()
            },
            apic_base: 0xfee0_0000 | 0x800 | if self.vcpu == 0 { 0x100 } else { 0 },
            ..Default::default()
        };
        self.apply_sregs(&mut s);
        s
    }

    /// Sets the boot state on a vCPU: its special registers (from its current ones),
    /// general-purpose registers, and MP state runnable.
    pub fn configure(&self, fd: &kvm_ioctls::VcpuFd) -> Result<(), GuestError> {
        let kvm = |op: &'static str| {
            let vcpu = self.vcpu;
            move |source| GuestError::Kvm { op, vcpu, source }
        };
        let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        self.apply_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs()).map_err(kvm("KVM_SET_REGS"))?;
        let mp = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        fd.set_mp_state(mp).map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_small_and_large_memories() {
        let l = GuestLayout::new(64 << 20, 1).unwrap();
        assert_eq!(l.data_start(), 0x40_0000);
        assert_eq!(l.data_pages(), (60 << 20) / 4096);
        assert!(l.ledger_gpa() + l.ledger_bytes() <= l.data_start());
        assert_eq!(
            l.shares(),
            &[Share {
                first_page: 0,
                pages: l.data_pages()
            }]
        );

        let l = GuestLayout::new(64 << 30, 3).unwrap();
        assert!(l.ledger_gpa() + l.ledger_bytes() <= l.data_start());
        assert_eq!(l.data_start() % (2 << 20), 0);
        assert_eq!(l.data_start() + l.data_pages() * 4096, 64 << 30);
        let total: u64 = l.shares().iter().map(|s| s.pages).sum();
        assert_eq!(total, l.data_pages());
        let max = l.shares().iter().map(|s| s.pages).max().unwrap();
        let min = l.shares().iter().map(|s| s.pages).min().unwrap();
        assert!(max - min <= 1);
        assert_eq!(l.shares()[1].first_page, l.shares()[0].pages);
        assert_eq!(l.page_directories(), 64);
        assert!(PD_GPA + l.page_directories() * 4096 <= STACKS_GPA);
        assert_eq!(l.owner(0), Some(0));
        assert_eq!(l.owner(l.shares()[2].first_page), Some(2));
        assert_eq!(l.owner(l.shares()[2].first_page - 1), Some(1));
        assert_eq!(l.owner(l.data_pages()), None);
        assert_eq!(l.stack_top(0), 0x51000);
        assert_eq!(l.vcpu_block_gpa(MAX_VCPUS - 1) + VCPU_BLOCK_SIZE, PML4_GPA);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(GuestLayout::new(32 << 20, 1).is_err());
        assert!(GuestLayout::new((64 << 20) + 100, 1).is_err());
        assert!(GuestLayout::new(65 << 30, 1).is_err());
        assert!(GuestLayout::new(64 << 20, 0).is_err());
        assert!(GuestLayout::new(64 << 20, MAX_VCPUS + 1).is_err());
        assert!(GuestLayout::new(64 << 20, MAX_VCPUS).is_ok());
    }

    #[test]
    fn boot_state() {
        let l = GuestLayout::new(64 << 20, 2).unwrap();
        let b = l.boot_state(1);
        let r = b.regs();
        assert_eq!((r.rip, r.rsp, r.rdi, r.rflags), (0x10_0000, 0x52000, 1, 2));
        let s = b.sregs();
        assert_eq!((s.cr3, s.efer, s.cs.l, s.cs.db), (0x3000, 0x500, 1, 0));
        assert_eq!(s.apic_base & 0x100, 0);
        assert_eq!(l.boot_state(0).sregs().apic_base & 0x100, 0x100);
    }
}
