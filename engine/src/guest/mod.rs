//! Guest programs: small x86-64 programs that behave like the memory side of HPC kernels,
//! loaded into guest memory and run by the micro-VM in 64-bit long mode.
//!
//! [`install`] writes the identity-mapped page tables, the parameter block, the code, an
//! all-zero ledger and the data fill. Each vCPU then runs the chosen [`Workload`] over its
//! own contiguous share of the data pages:
//!
//! | workload | what it does per step |
//! |---|---|
//! | `idle` | verifies the next page of its share (no writes), at the rate limit (1000 pages/s if none), sleeping in `hlt` in between |
//! | `dirty-all` | check+write of every page of its share in order, forever |
//! | `seq` | MG-like sweep: check+write of the first `wss` pages of its share in order, repeatedly |
//! | `random` | IS-like scatter: check+write of a pseudo-random page (xorshift64) of the first `wss` pages |
//! | `hotcold` | 15 of 16 writes to a random page of the first `hot` pages, 1 of 16 anywhere in the share |
//!
//! **Self-check.** Every data page starts with a 16-byte header `(h0, h1)` and has a `u32`
//! write counter `c` in the ledger. A page is valid if `c == 0 && h0 == 0 && h1 == 0`, or
//! `h0 == gpa ^ HEADER_SIG && h1 == c`. A check+write verifies the page (counting a failure
//! and printing `FAIL vcpu N page P` with `P` the guest frame number `gpa >> 12` if it is
//! invalid), then writes `h0 = gpa ^ HEADER_SIG`, `h1 = c + 1`, ledger `c + 1` (wrapping at
//! 2^32); a page whose `h0` already holds that value is not stored to again. The rest of the
//! page is left alone, so the fill keeps its compressibility. A migration that loses a page
//! write or a ledger write is caught by the guest the next time it touches the page, and by
//! [`audit`] on a paused VM.
//!
//! **Speed.** On this project's KVM (a PVM flavour, guest code largely emulated) one vCPU
//! alone on a core measured about 110–125 k page writes/s for `dirty-all` and `seq`, 70–80 k
//! for `random` and `hotcold`; two vCPUs on two busy cores about half that each.
//!
//! **Reports.** Every report interval each vCPU prints `vcpu N: writes W checks C fails F`
//! on COM1 (port 0x3f8, one `out` per byte) and keeps the same counters in its per-vCPU
//! block, which [`status`] reads.
//!
//! **Pacing.** With a rate limit (always, for `idle`) the program keeps a TSC deadline and
//! waits until it passes; if it falls more than one report interval behind (the VM was
//! paused, say for a migration) or the TSC jumped, it restarts from now instead of bursting.
//! It waits asleep: each vCPU runs its local APIC timer (x2APIC, periodic, vector 0x20,
//! every `clamp(1 s / rate, 4 ms, report interval)` at KVM's default 1 GHz APIC bus) and
//! executes `sti; hlt; cli` until the deadline, so an idle vCPU thread sits blocked in
//! `KVM_RUN` instead of burning a core: an `idle` vCPU at 1000 checks/s measured 0.87 s of
//! CPU per second spinning, 0.045 s asleep. The handler only acknowledges the interrupt
//! (x2APIC EOI) and counts it in [`VcpuStatus::wakes`]; interrupts are masked everywhere
//! else, so the workloads without a rate limit run as before, with no timer. This needs
//! the in-kernel irqchip and x2APIC in the vCPU's CPUID (the micro-VM sets KVM's supported
//! CPUID); without x2APIC the program spins with `PAUSE` as it used to. The sleep survives
//! save/restore: IDTR/GDTR are in the special registers, the timer in the LAPIC state, a
//! sleeping vCPU's `HALTED` in its MP state.
//!
//! The memory layout is described on [`GuestLayout`]; the boot registers on [`BootState`].

mod asm;
mod check;
mod fill;
mod layout;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

pub use check::{audit, status, AuditResult, BadPage, VcpuStatus, AUDIT_MAX_LISTED};
pub use fill::{MixedFill, PageClass};
pub use layout::{
    BootState, GuestLayout, Share, CODE_GPA, DESC_GPA, HEADER_SIG, LEDGER_GPA, MAX_MEM_BYTES,
    MAX_VCPUS, MIN_MEM_BYTES, PARAM_GPA, PARAM_MAGIC, PML4_GPA, SPURIOUS_VECTOR, TIMER_VECTOR,
};

use layout::{
    param, vcpu_block, GDTR_GPA, GDT_GPA, IDTR_GPA, IDT_GPA, IDT_VECTORS, PDPT_GPA, PD_GPA,
};

/// Errors of the guest programs.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest memory of {bytes} bytes is not a multiple of 4 KiB between 64 MiB and 64 GiB")]
    MemorySize { bytes: u64 },
    #[error("guest memory must be contiguous from gpa 0 (layout {layout:x?})")]
    MemoryShape { layout: Vec<(u64, u64)> },
    #[error("{vcpus} vCPUs: the guest program supports 1 to {MAX_VCPUS}")]
    VcpuCount { vcpus: u32 },
    #[error("invalid guest parameter: {0}")]
    Param(String),
    #[error("unknown workload {0:?} (idle, dirty-all, seq, random, hotcold)")]
    ParseWorkload(String),
    #[error("unknown fill {0:?} (zero, mixed)")]
    ParseFill(String),
    #[error("assembling the guest program")]
    Assemble(#[source] iced_x86::IcedError),
    #[error("guest program of {len} bytes does not fit below the ledger")]
    CodeTooLarge { len: usize },
    #[error("{what} at gpa={gpa:#x}")]
    Memory {
        what: &'static str,
        gpa: u64,
        #[source]
        source: MemoryError,
    },
    #[error("no guest program installed: parameter block magic is {found:#x}")]
    NotInstalled { found: u64 },
    #[error("the parameter block is inconsistent: {0}")]
    BadParams(String),
    #[error("{op} on vCPU {vcpu}")]
    Kvm {
        op: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What each vCPU of the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Verifies pages without writing any, at the rate limit (1000 pages/s if none),
    /// asleep in `hlt` in between.
    #[default]
    Idle,
    /// Writes every page of the vCPU's share in order, as fast as allowed.
    DirtyAll,
    /// Sweeps the working set in order (like NPB MG).
    Seq,
    /// Writes random pages of the working set (like NPB IS).
    Random,
    /// 15/16 of writes go to a hot set, the rest anywhere in the share.
    #[serde(rename = "hotcold")]
    HotCold,
}

impl Workload {
    /// Every workload, in the order of their codes.
    pub const ALL: [Workload; 5] = [
        Workload::Idle,
        Workload::DirtyAll,
        Workload::Seq,
        Workload::Random,
        Workload::HotCold,
    ];

    /// The name used on the command line, in reports and in serde.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::DirtyAll => "dirty-all",
            Workload::Seq => "seq",
            Workload::Random => "random",
            Workload::HotCold => "hotcold",
        }
    }

    /// The code stored in the parameter block.
    pub fn code(self) -> u64 {
        match self {
            Workload::Idle => 0,
            Workload::DirtyAll => 1,
            Workload::Seq => 2,
            Workload::Random => 3,
            Workload::HotCold => 4,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = GuestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| GuestError::ParseWorkload(s.to_string()))
    }
}

/// What the data pages hold at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fill {
    /// All zero (the data pages are not touched).
    Zero,
    /// A deterministic mix: about 25% zero pages, 35% text, 25% code-like bytes, 15% random
    /// bytes, chosen per page from `seed` (see [`MixedFill`]).
    Mixed { seed: u64 },
}

impl Default for Fill {
    fn default() -> Self {
        Fill::Mixed { seed: 1 }
    }
}

impl fmt::Display for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fill::Zero => f.write_str("zero"),
            Fill::Mixed { .. } => f.write_str("mixed"),
        }
    }
}

impl FromStr for Fill {
    type Err = GuestError;
    /// `zero` or `mixed` (with the default seed 1).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zero" => Ok(Fill::Zero),
            "mixed" => Ok(Fill::default()),
            _ => Err(GuestError::ParseFill(s.to_string())),
        }
    }
}

/// What the guest program does, and how fast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestParams {
    /// The workload every vCPU runs.
    pub workload: Workload,
    /// Working set per vCPU in bytes (rounded up to pages, clamped to the vCPU's share);
    /// 0 = the whole share.
    pub wss_bytes: u64,
    /// Page writes (page checks for `idle`) per second per vCPU; 0 = unlimited (1000 for
    /// `idle`).
    pub rate_pages_per_s: u64,
    /// Content of the data pages at boot.
    pub fill: Fill,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Hot set per vCPU in bytes for `hotcold`; 0 = a sixteenth of the working set.
    pub hot_bytes: u64,
    /// Seed of the random workloads (each vCPU uses `seed ^ index`).
    pub seed: u64,
    /// TSC frequency in kHz (`KVM_GET_TSC_KHZ`), for pacing and reports. Must be set.
    pub tsc_khz: u32,
    /// Interval between report lines in milliseconds (default 1000).
    pub report_interval_ms: u32,
}

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            workload: Workload::Idle,
            wss_bytes: 0,
            rate_pages_per_s: 0,
            fill: Fill::default(),
            vcpus: 1,
            hot_bytes: 0,
            seed: 1,
            tsc_khz: 0,
            report_interval_ms: 1000,
        }
    }
}

/// Installs the guest program into fresh (all-zero) guest memory: page tables, parameter
/// block, code, a zero ledger and the data fill. Data pages that the fill leaves zero are not
/// written, so their host memory stays unallocated; memory that is not fresh must be zeroed
/// first. Returns the layout the vCPUs boot with ([`GuestLayout::boot_state`]).
pub fn install(mem: &GuestMemory, params: &GuestParams) -> Result<GuestLayout, GuestError> {
    let regions = mem.layout();
    let contiguous = regions.first().is_some_and(|r| r.0 == 0)
        && regions.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0);
    if !contiguous {
        return Err(GuestError::MemoryShape { layout: regions });
    }
    let layout = GuestLayout::new(mem.size(), params.vcpus)?;
    if params.tsc_khz == 0 {
        return Err(GuestError::Param(
            "tsc_khz must be set (KVM_GET_TSC_KHZ)".into(),
        ));
    }
    if params.report_interval_ms == 0 {
        return Err(GuestError::Param(
            "report_interval_ms must be positive".into(),
        ));
    }
    write_page_tables(mem, &layout)?;
    write_params(mem, &layout, params)?;
    let prog = asm::program()?;
    if CODE_GPA + prog.code.len() as u64 > LEDGER_GPA {
        return Err(GuestError::CodeTooLarge {
            len: prog.code.len(),
        });
    }
    write_descriptors(mem, &prog)?;
    write_at(mem, CODE_GPA, &prog.code, "writing the code")?;
    let ledger = layout.ledger_bytes().next_multiple_of(PAGE_SIZE as u64);
    zero_at(mem, LEDGER_GPA, ledger, "zeroing the ledger")?;
    fill::fill(mem, &layout, params.fill)?;
    Ok(layout)
}

fn write_page_tables(mem: &GuestMemory, layout: &GuestLayout) -> Result<(), GuestError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let mut pml4 = vec![0u8; PAGE_SIZE];
    pml4[..8].copy_from_slice(&(PDPT_GPA | PRESENT_RW).to_le_bytes());
    write_at(mem, PML4_GPA, &pml4, "writing the PML4")?;
    let mut pdpt = vec![0u8; PAGE_SIZE];
    for i in 0..layout.page_directories() as usize {
        let e = (PD_GPA + (i * PAGE_SIZE) as u64) | PRESENT_RW;
        pdpt[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    write_at(mem, PDPT_GPA, &pdpt, "writing the PDPT")?;
    let mut pds = vec![0u8; layout.page_directories() as usize * PAGE_SIZE];
    for j in 0..layout.huge_pages() as usize {
        let e = ((j as u64) << 21) | PRESENT_RW | HUGE;
        pds[j * 8..j * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    write_at(mem, PD_GPA, &pds, "writing the page directories")
}

/// The descriptor page: a GDT matching the boot segments, the GDTR and IDTR
/// pseudo-descriptors, and an IDT with the timer and spurious vectors present.
fn write_descriptors(mem: &GuestMemory, prog: &asm::Program) -> Result<(), GuestError> {
    /// 64-bit code, present, DPL 0, accessed (so the CPU never writes the descriptor).
    const CODE64: u64 = 0x00af_9b00_0000_ffff;
    /// Read/write data, present, DPL 0, 4 GiB, accessed.
    const DATA: u64 = 0x00cf_9300_0000_ffff;
    /// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    const INTERRUPT_GATE: u64 = 0x8e;
    const CODE_SELECTOR: u64 = 0x08;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut put = |gpa: u64, bytes: &[u8]| {
        let off = (gpa - DESC_GPA) as usize;
        page[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(GDT_GPA + 8, &CODE64.to_le_bytes());
    put(GDT_GPA + 16, &DATA.to_le_bytes());
    for (at, base, limit) in [
        (GDTR_GPA, GDT_GPA, 3 * 8 - 1),
        (IDTR_GPA, IDT_GPA, IDT_VECTORS * 16 - 1),
    ] {
        put(at, &(limit as u16).to_le_bytes());
        put(at + 2, &base.to_le_bytes());
    }
    for (vector, handler) in [
        (TIMER_VECTOR, prog.timer_isr),
        (SPURIOUS_VECTOR, prog.spurious_isr),
    ] {
        let low = (handler & 0xffff)
            | CODE_SELECTOR << 16
            | INTERRUPT_GATE << 40
            | (handler >> 16 & 0xffff) << 48;
        let gate = IDT_GPA + u64::from(vector) * 16;
        put(gate, &low.to_le_bytes());
        put(gate + 8, &(handler >> 32).to_le_bytes());
    }
    write_at(mem, DESC_GPA, &page, "writing the descriptor page")
}

/// Shortest period of the guest's local APIC timer: each wake-up costs the vCPU thread about
/// 35 µs of CPU here, so an `idle` guest at its default 1000 checks/s wakes 250 times a
/// second and runs 4 checks per wake-up (measured: 4.5% of a core, against 7.5% with a
/// 1 ms tick and 3.9% with 10 ms).
const TIMER_MIN_PERIOD_NS: u64 = 4_000_000;

/// The local APIC timer period (in APIC bus cycles, 1 ns each at KVM's default) for a run
/// at `rate` steps per second (0 = unlimited): a step's time, but at least
/// [`TIMER_MIN_PERIOD_NS`] (a tick wakes the vCPU for every step it passed, in a burst) and
/// at most the report interval (reports are printed on wake-ups). 0, no timer, when the run
/// is not rate limited.
fn timer_count(p: &GuestParams) -> u64 {
    let rate = match (p.workload, p.rate_pages_per_s) {
        (Workload::Idle, 0) => asm::IDLE_DEFAULT_RATE,
        (_, r) => r,
    };
    // As the guest: a rate above the TSC frequency is no limit.
    if rate == 0 || u64::from(p.tsc_khz) * 1000 < rate {
        return 0;
    }
    let max_ns = (u64::from(p.report_interval_ms) * 1_000_000)
        .clamp(TIMER_MIN_PERIOD_NS, u64::from(u32::MAX));
    (1_000_000_000 / rate).clamp(TIMER_MIN_PERIOD_NS, max_ns)
}

fn write_params(
    mem: &GuestMemory,
    layout: &GuestLayout,
    p: &GuestParams,
) -> Result<(), GuestError> {
    let max_share = layout.shares().iter().map(|s| s.pages).max().unwrap_or(1);
    let pages = |bytes: u64| bytes.div_ceil(PAGE_SIZE as u64);
    let wss = if p.wss_bytes == 0 {
        max_share
    } else {
        pages(p.wss_bytes).min(max_share)
    };
    let hot = if p.hot_bytes == 0 {
        (wss / 16).max(1)
    } else {
        pages(p.hot_bytes).min(max_share)
    };
    let tsc_khz = u64::from(p.tsc_khz);
    let mut block = vec![0u8; PAGE_SIZE];
    let mut put = |off: u64, v: u64| {
        let off = off as usize;
        block[off..off + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(param::MAGIC, u64::from_le_bytes(PARAM_MAGIC));
    put(param::WORKLOAD, p.workload.code());
    put(param::DATA_START, layout.data_start());
    put(param::DATA_PAGES, layout.data_pages());
    put(param::LEDGER, layout.ledger_gpa());
    put(param::WSS_PAGES, wss);
    put(param::RATE, p.rate_pages_per_s);
    put(param::TSC_KHZ, tsc_khz);
    put(param::NVCPUS, u64::from(layout.vcpus()));
    put(
        param::REPORT_TICKS,
        tsc_khz * u64::from(p.report_interval_ms),
    );
    put(param::HOT_PAGES, hot);
    put(param::SEED, p.seed);
    put(param::TIMER_COUNT, timer_count(p));
    for (i, s) in layout.shares().iter().enumerate() {
        let base = layout.vcpu_block_gpa(i as u32) - PARAM_GPA;
        put(base + vcpu_block::FIRST_PAGE, s.first_page);
        put(base + vcpu_block::PAGES, s.pages);
        put(base + vcpu_block::INDEX, i as u64);
    }
    write_at(mem, PARAM_GPA, &block, "writing the parameter block")
}

/// Writes `data` at `gpa`, split across regions.
fn write_at(
    mem: &GuestMemory,
    gpa: u64,
    data: &[u8],
    what: &'static str,
) -> Result<(), GuestError> {
    for_each_piece(mem, gpa, data.len() as u64, what, |g, off, len| {
        mem.write(g, &data[off..off + len])
    })
}

/// Reads into `buf` from `gpa`, split across regions.
fn read_at(
    mem: &GuestMemory,
    gpa: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), GuestError> {
    let len = buf.len() as u64;
    for_each_piece(mem, gpa, len, what, |g, off, n| {
        mem.read(g, &mut buf[off..off + n])
    })
}

/// Zeroes `len` bytes at `gpa`, split across regions.
fn zero_at(mem: &GuestMemory, gpa: u64, len: u64, what: &'static str) -> Result<(), GuestError> {
    for_each_piece(mem, gpa, len, what, |g, _, n| mem.zero(g, n as u64))
}

/// Calls `f(gpa, offset, len)` for each piece of `[gpa, gpa+len)` that lies in one region.
fn for_each_piece(
    mem: &GuestMemory,
    gpa: u64,
    len: u64,
    what: &'static str,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
) -> Result<(), GuestError> {
    let err = |source| GuestError::Memory { what, gpa, source };
    let mut done = 0u64;
    while done < len {
        let g = gpa + done;
        let region = mem
            .regions()
            .iter()
            .find(|r| g >= r.gpa() && g < r.gpa() + r.len())
            .ok_or(MemoryError::OutOfRange {
                gpa: g,
                len: len - done,
            })
            .map_err(err)?;
        let n = (region.gpa() + region.len() - g).min(len - done);
        f(g, done as usize, n as usize).map_err(err)?;
        done += n;
    }
    Ok(())
}
