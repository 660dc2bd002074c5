//! The VMM's view of a running guest program: its progress counters ([`status`]) and a full
//! check of every data page against the ledger ([`audit`]).

use std::thread;

use serde::{Deserialize, Serialize};

use super::layout::{
    param, vcpu_block, GuestLayout, HEADER_SIG, MAX_VCPUS, PARAM_GPA, PARAM_MAGIC,
};
use super::{read_at, GuestError};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// At most this many bad pages are listed in an [`AuditResult`] (all are counted).
pub const AUDIT_MAX_LISTED: usize = 64;
/// Pages audited per batch (one ledger read).
const BATCH: u64 = 1024;
/// Below this many data pages the audit runs on the calling thread only.
const PARALLEL_MIN_PAGES: u64 = 64 << 10;

/// Progress of one vCPU of the guest program, as it keeps it in its per-vCPU block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    /// Page writes done.
    pub writes: u64,
    /// Self-check failures seen by the guest.
    pub fails: u64,
    /// Page verifications done (one per write, plus the reads of `idle`).
    pub checks: u64,
    /// Report lines printed.
    pub reports: u64,
    /// Timer interrupts taken: how often the vCPU woke from `hlt` (0 if it spins).
    #[serde(default)]
    pub wakes: u64,
}

/// A data page whose header does not match its ledger entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadPage {
    /// Index among data pages.
    pub page: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// The vCPU whose share holds the page.
    pub vcpu: u32,
    /// The ledger entry.
    pub ledger: u32,
    /// The header's first word.
    pub h0: u64,
    /// The header's second word.
    pub h1: u64,
}

/// Result of [`audit`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditResult {
    /// Data pages checked.
    pub pages_checked: u64,
    /// Pages found inconsistent.
    pub bad_pages: u64,
    /// The first [`AUDIT_MAX_LISTED`] of them.
    pub bad: Vec<BadPage>,
    /// Pages caught in the middle of a check+write (header written, ledger not yet): at most
    /// one per vCPU, which a paused vCPU legitimately leaves behind; not counted as bad.
    pub in_flight: Vec<BadPage>,
}

impl AuditResult {
    /// Whether every page is consistent.
    pub fn is_clean(&self) -> bool {
        self.bad_pages == 0
    }
}

/// Reads every vCPU's progress counters from the parameter block.
pub fn status(mem: &GuestMemory) -> Result<Vec<VcpuStatus>, GuestError> {
    let (layout, block) = read_layout(mem)?;
    Ok((0..layout.vcpus())
        .map(|i| {
            let base = layout.vcpu_block_gpa(i) - PARAM_GPA;
            VcpuStatus {
                writes: field(&block, base + vcpu_block::WRITES),
                fails: field(&block, base + vcpu_block::FAILS),
                checks: field(&block, base + vcpu_block::CHECKS),
                reports: field(&block, base + vcpu_block::REPORTS),
                wakes: field(&block, base + vcpu_block::WAKES),
            }
        })
        .collect())
}

/// Checks every data page's header against its ledger entry, with the rule the guest uses.
/// Run it on a paused VM (a running guest changes pages while they are read). Uses every
/// core for large memories.
pub fn audit(mem: &GuestMemory) -> Result<AuditResult, GuestError> {
    let (layout, _) = read_layout(mem)?;
    let pages = layout.data_pages();
    let threads = if pages < PARALLEL_MIN_PAGES {
        1
    } else {
        thread::available_parallelism().map_or(1, |n| n.get() as u64)
    };
    let per = pages.div_ceil(threads).next_multiple_of(BATCH);
    let parts = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (first, end) = ((t * per).min(pages), ((t + 1) * per).min(pages));
                let layout = &layout;
                crate::threads::spawn(s, move || audit_range(mem, layout, first, end))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>, GuestError>>()
    })?;
    let mut out = AuditResult::default();
    let mut in_flight = vec![0u64; layout.vcpus() as usize];
    let mut candidates = Vec::new();
    for part in parts {
        out.pages_checked += part.pages_checked;
        out.bad_pages += part.bad_pages;
        for b in part.bad {
            if out.bad.len() < AUDIT_MAX_LISTED {
                out.bad.push(b);
            }
        }
        for (n, m) in in_flight.iter_mut().zip(&part.in_flight_per_vcpu) {
            *n += m;
        }
        candidates.extend(part.in_flight);
    }
    // One half-written page per vCPU is a vCPU paused mid-write; more is corruption.
    for (vcpu, &n) in in_flight.iter().enumerate() {
        let mine = candidates.iter().filter(|b| b.vcpu as usize == vcpu);
        if n <= 1 {
            out.in_flight.extend(mine);
        } else {
            out.bad_pages += n;
            for &b in mine {
                if out.bad.len() < AUDIT_MAX_LISTED {
                    out.bad.push(b);
                }
            }
        }
    }
    out.bad.sort_by_key(|b| b.page);
    Ok(out)
}

#[derive(Default)]
struct Part {
    pages_checked: u64,
    bad_pages: u64,
    bad: Vec<BadPage>,
    in_flight_per_vcpu: Vec<u64>,
    /// Up to [`AUDIT_MAX_LISTED`] in-flight candidates per vCPU.
    in_flight: Vec<BadPage>,
}

fn audit_range(
    mem: &GuestMemory,
    layout: &GuestLayout,
    first: u64,
    end: u64,
) -> Result<Part, GuestError> {
    let mut part = Part {
        in_flight_per_vcpu: vec![0; layout.vcpus() as usize],
        ..Default::default()
    };
    let mut ledger = vec![0u8; BATCH as usize * 4];
    let mut header = [0u8; 16];
    let mut batch = first;
    while batch < end {
        let n = (end - batch).min(BATCH);
        let entries = &mut ledger[..n as usize * 4];
        read_at(
            mem,
            layout.ledger_entry_gpa(batch),
            entries,
            "reading the ledger",
        )?;
        for (i, e) in entries.chunks_exact(4).enumerate() {
            let page = batch + i as u64;
            let gpa = layout.data_page_gpa(page);
            mem.read(gpa, &mut header)
                .map_err(|source| GuestError::Memory {
                    what: "reading a page header",
                    gpa,
                    source,
                })?;
            let c = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let h0 = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let h1 = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
            let signed = h0 == gpa ^ HEADER_SIG;
            if (c == 0 && h0 == 0 && h1 == 0) || (signed && h1 == u64::from(c)) {
                continue;
            }
            let vcpu = layout.owner(page).unwrap_or(0);
            let b = BadPage {
                page,
                gpa,
                vcpu,
                ledger: c,
                h0,
                h1,
            };
            if signed && h1 == u64::from(c.wrapping_add(1)) {
                part.in_flight_per_vcpu[vcpu as usize] += 1;
                if part.in_flight_per_vcpu[vcpu as usize] <= AUDIT_MAX_LISTED as u64 {
                    part.in_flight.push(b);
                }
            } else {
                part.bad_pages += 1;
                if part.bad.len() < AUDIT_MAX_LISTED {
                    part.bad.push(b);
                }
            }
        }
        part.pages_checked += n;
        batch += n;
    }
    Ok(part)
}

/// Reads the parameter block and checks it against the layout of this memory.
fn read_layout(mem: &GuestMemory) -> Result<(GuestLayout, Vec<u8>), GuestError> {
    let mut block = vec![0u8; PAGE_SIZE];
    read_at(mem, PARAM_GPA, &mut block, "reading the parameter block")?;
    let magic = field(&block, param::MAGIC);
    if magic != u64::from_le_bytes(PARAM_MAGIC) {
        return Err(GuestError::NotInstalled { found: magic });
    }
    let nvcpus = field(&block, param::NVCPUS);
    if nvcpus == 0 || nvcpus > u64::from(MAX_VCPUS) {
        return Err(GuestError::BadParams(format!("{nvcpus} vCPUs")));
    }
    let layout = GuestLayout::new(mem.size(), nvcpus as u32)?;
    let found = (
        field(&block, param::DATA_START),
        field(&block, param::DATA_PAGES),
        field(&block, param::LEDGER),
    );
    let want = (
        layout.data_start(),
        layout.data_pages(),
        layout.ledger_gpa(),
    );
    if found != want {
        return Err(GuestError::BadParams(format!(
            "(data_start, data_pages, ledger) is {found:#x?}, this memory needs {want:#x?}"
        )));
    }
    for (i, s) in layout.shares().iter().enumerate() {
        let base = layout.vcpu_block_gpa(i as u32) - PARAM_GPA;
        let share = (
            field(&block, base + vcpu_block::FIRST_PAGE),
            field(&block, base + vcpu_block::PAGES),
        );
        if share != (s.first_page, s.pages) {
            return Err(GuestError::BadParams(format!(
                "vCPU {i}'s share is {share:?}"
            )));
        }
    }
    Ok((layout, block))
}

fn field(block: &[u8], off: u64) -> u64 {
    let off = off as usize;
    u64::from_le_bytes(block[off..off + 8].try_into().expect("8 bytes"))
}
