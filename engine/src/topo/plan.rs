//! The placement planner: which worker runs where, sends on which lane, owns which memory.

use std::cmp::Reverse;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{NodeId, Topology};
use crate::memory::PAGE_SIZE;

/// Default largest range: 64 MiB.
pub const DEFAULT_RANGE_BYTES: u64 = 64 << 20;

const PAGE: u64 = PAGE_SIZE as u64;

/// A piece of guest memory and the NUMA node that holds it (`None`: unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// NUMA node of its host pages, if known.
    pub node: Option<NodeId>,
}

impl MemRegion {
    /// The regions of a memory layout (`(gpa, len)` pairs), all on `node`.
    pub fn from_layout(layout: &[(u64, u64)], node: Option<NodeId>) -> Vec<MemRegion> {
        layout
            .iter()
            .map(|&(gpa, len)| MemRegion { gpa, len, node })
            .collect()
    }
}

/// Tuning of the planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Number of workers; `None` (the default) means one per usable CPU.
    pub workers: Option<usize>,
    /// Largest range in bytes: a non-zero multiple of the page size. Default 64 MiB.
    pub range_bytes: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            workers: None,
            range_bytes: DEFAULT_RANGE_BYTES,
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No node of the topology has a usable CPU.
    #[error("the topology has no usable CPU")]
    NoCpus,
    /// No lane to send on.
    #[error("no lanes to send on")]
    NoLanes,
    /// Zero workers asked for.
    #[error("the number of workers must be at least 1")]
    ZeroWorkers,
    /// The range size is zero or not a multiple of the page size.
    #[error("range size {range_bytes} is not a non-zero multiple of {PAGE_SIZE}")]
    RangeSize {
        /// The range size asked for.
        range_bytes: u64,
    },
    /// No guest memory.
    #[error("the guest has no memory regions")]
    NoMemory,
    /// A region is empty, not page aligned, overflows, or overlaps another.
    #[error("memory region gpa={gpa:#x} len={len:#x}: {reason}")]
    Region {
        /// Its first address.
        gpa: u64,
        /// Its length.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Where one worker runs and what it sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// Worker index, `0..workers.len()`.
    pub id: usize,
    /// The CPU to pin it to ([`super::pin_current_thread`]).
    pub cpu: usize,
    /// The NUMA node of that CPU.
    pub node: NodeId,
    /// Index of the lane it sends on, into the planner's `lanes`.
    pub lane: usize,
    /// Its ranges, `(gpa, len)`, sorted by address.
    pub ranges: Vec<(u64, u64)>,
    /// Sum of the ranges' lengths.
    pub bytes: u64,
    /// Bytes of its ranges held by another (known) node than its own.
    pub remote_bytes: u64,
}

/// The placement of the parallel data path; see [`plan()`] for how it is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Largest range, bytes.
    pub range_bytes: u64,
    /// Guest memory, bytes.
    pub total_bytes: u64,
    /// NUMA node of each lane's NIC (`None`: unknown), as given to the planner.
    pub lane_nodes: Vec<Option<NodeId>>,
    /// The workers, by id.
    pub workers: Vec<WorkerPlan>,
    /// Usable CPUs in the topology; more workers than this share CPUs.
    pub cpus: usize,
}

/// Splits guest memory into ranges of at most `range_bytes`: each region is cut from its
/// start, so every range is page aligned, lies inside one region (keeping its node), and
/// together they cover every page of every region exactly once. Regions come back sorted.
pub fn split_ranges(regions: &[MemRegion], range_bytes: u64) -> Result<Vec<MemRegion>, PlanError> {
    if range_bytes == 0 || range_bytes % PAGE != 0 {
        return Err(PlanError::RangeSize { range_bytes });
    }
    if regions.is_empty() {
        return Err(PlanError::NoMemory);
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.gpa);
    let mut out = Vec::new();
    let mut prev_end = 0u64;
    for (i, r) in sorted.iter().enumerate() {
        let bad = |reason| PlanError::Region {
            gpa: r.gpa,
            len: r.len,
            reason,
        };
        if r.len == 0 {
            return Err(bad("empty"));
        }
        if r.gpa % PAGE != 0 || r.len % PAGE != 0 {
            return Err(bad("not page aligned"));
        }
        let end = r.gpa.checked_add(r.len).ok_or(bad("end overflows"))?;
        if i > 0 && r.gpa < prev_end {
            return Err(bad("overlaps the previous region"));
        }
        prev_end = end;
        let mut gpa = r.gpa;
        while gpa < end {
            let len = range_bytes.min(end - gpa);
            out.push(MemRegion {
                gpa,
                len,
                node: r.node,
            });
            gpa += len;
        }
    }
    Ok(out)
}

/// Plans the parallel data path: splits guest memory into ranges and gives each range to a
/// worker, each worker a CPU and a lane.
///
/// `lanes` holds the NUMA node of each lane's NIC (`None` when unknown). `memory` is the
/// guest layout with, for each region, the node holding it (`None` when unknown).
///
/// # Rules
///
/// Let *W* be the number of workers ([`PlanConfig::workers`], default one per usable CPU),
/// *R* the range size, and *mean* = guest bytes / *W*. A node *takes part* if it has a CPU.
///
/// 1. **Ranges** ([`split_ranges`]): each region is cut from its start into ranges of at most
///    *R* bytes; every page is in exactly one range, no range crosses a region.
/// 2. **Workers per node**: each node gets workers in proportion to the guest memory it holds
///    (memory of unknown node, or on a node without CPUs, counts as spread over the nodes
///    that have a lane, in proportion to their CPUs; over all nodes if none has one), by
///    largest remainder, one at a time. Ties go to a node with a lane, then to the one with
///    more free CPUs, then to the lower id. A node gets at most as many workers as CPUs,
///    unless *W* exceeds the usable CPUs: then CPUs are shared, each node taking at most
///    `ceil(W / CPUs)` workers per CPU.
/// 3. **CPUs**: the workers of a node take its CPUs in [`super::Node::cpus`] order (distinct
///    physical cores first, then SMT siblings), one each, so distinct workers get distinct
///    CPUs whenever *W* ≤ the usable CPUs. Worker ids go in node order.
/// 4. **Lanes**: a worker sends on a lane whose NIC is on its node, round-robin among those;
///    if its node has none, on a lane of unknown node; failing that, on any lane. Within
///    the chosen set it takes the lane fewest workers use so far (lowest index on ties).
/// 5. **Memory to nodes**: a node with *k* workers has a budget of *k* × *mean* bytes. It
///    first keeps its own ranges, in address order, each that still fits in its budget.
///    The rest (ranges that did not fit, and ranges of unknown node or of nodes without
///    workers), largest first, go to the node furthest below its budget (ties: the range's
///    own node, then the lower id). So memory leaves its node only when the node's workers
///    already hold more than their share minus one range.
/// 6. **Memory to workers**: within a node, its workers take its ranges in address order,
///    each up to *mean* bytes before the next worker starts, so each holds contiguous
///    memory; ranges left over, largest first, go to the node's least loaded worker (ties:
///    lower id).
///
/// Consequences (checked by property tests): every worker holds between *mean* − *R* and
/// *mean* + *R* bytes; when each node holds exactly its workers' share of memory (e.g.
/// equal memory and equal worker counts per node), every range is sent by a worker on its
/// own node, and that worker sends on a NIC of that node if the node has one.
pub fn plan(
    topo: &Topology,
    memory: &[MemRegion],
    lanes: &[Option<NodeId>],
    cfg: &PlanConfig,
) -> Result<Plan, PlanError> {
    let ranges = split_ranges(memory, cfg.range_bytes)?;
    if lanes.is_empty() {
        return Err(PlanError::NoLanes);
    }
    let nodes: Vec<&super::Node> = topo.nodes.iter().filter(|n| !n.cpus.is_empty()).collect();
    let cpus: usize = nodes.iter().map(|n| n.cpus.len()).sum();
    if cpus == 0 {
        return Err(PlanError::NoCpus);
    }
    let w = cfg.workers.unwrap_or(cpus);
    if w == 0 {
        return Err(PlanError::ZeroWorkers);
    }
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let node_index = |id: Option<NodeId>| id.and_then(|id| nodes.iter().position(|n| n.id == id));

    let counts = workers_per_node(&nodes, &ranges, lanes, w, total, &node_index);

    // Rules 3 and 4: CPUs and lanes.
    let mut workers = Vec::with_capacity(w);
    let mut lane_use = vec![0usize; lanes.len()];
    for (ni, node) in nodes.iter().enumerate() {
        for k in 0..counts[ni] {
            let on = |want: Option<NodeId>| -> Vec<usize> {
                (0..lanes.len()).filter(|&l| lanes[l] == want).collect()
            };
            let mut choice = on(Some(node.id));
            if choice.is_empty() {
                choice = on(None);
            }
            if choice.is_empty() {
                choice = (0..lanes.len()).collect();
            }
            let lane = choice
                .into_iter()
                .min_by_key(|&l| (lane_use[l], l))
                .unwrap_or(0);
            lane_use[lane] += 1;
            workers.push(WorkerPlan {
                id: workers.len(),
                cpu: node.cpus[k % node.cpus.len()],
                node: node.id,
                lane,
                ranges: Vec::new(),
                bytes: 0,
                remote_bytes: 0,
            });
        }
    }

    // Rule 5: memory to nodes, with budgets counts[n] * total / w (compared times w).
    let (w128, total128) = (w as i128, total as i128);
    let mut node_bytes = vec![0u64; nodes.len()];
    let mut node_ranges: Vec<Vec<MemRegion>> = vec![Vec::new(); nodes.len()];
    let mut pending = Vec::new();
    for r in &ranges {
        match node_index(r.node) {
            Some(ni)
                if ((node_bytes[ni] + r.len) as i128) * w128 <= counts[ni] as i128 * total128 =>
            {
                node_bytes[ni] += r.len;
                node_ranges[ni].push(*r);
            }
            _ => pending.push(*r),
        }
    }
    pending.sort_by_key(|r| (Reverse(r.len), r.gpa));
    for r in pending {
        let own = node_index(r.node);
        let ni = (0..nodes.len())
            .filter(|&ni| counts[ni] > 0)
            .max_by_key(|&ni| {
                let room = counts[ni] as i128 * total128 - node_bytes[ni] as i128 * w128;
                (room, own == Some(ni), Reverse(ni))
            })
            .unwrap_or(0);
        node_bytes[ni] += r.len;
        node_ranges[ni].push(r);
    }

    // Rule 6: memory to workers within a node: contiguous fill up to the mean, then the
    // leftovers to the least loaded.
    let mut first = 0;
    for (ni, node) in nodes.iter().enumerate() {
        let mine = first..first + counts[ni];
        first += counts[ni];
        let mut list = std::mem::take(&mut node_ranges[ni]);
        list.sort_by_key(|r| r.gpa);
        let give = |workers: &mut [WorkerPlan], wi: usize, r: &MemRegion| {
            let wp = &mut workers[wi];
            wp.ranges.push((r.gpa, r.len));
            wp.bytes += r.len;
            if r.node.is_some_and(|n| n != node.id) {
                wp.remote_bytes += r.len;
            }
        };
        let mut leftover = Vec::new();
        let mut cur = mine.start;
        for r in list {
            let fits = |wi: usize| ((workers[wi].bytes + r.len) as i128) * w128 <= total128;
            if cur < mine.end && !fits(cur) {
                cur += 1;
            }
            if cur < mine.end && fits(cur) {
                give(&mut workers, cur, &r);
            } else {
                leftover.push(r);
            }
        }
        leftover.sort_by_key(|r| (Reverse(r.len), r.gpa));
        for r in leftover {
            if let Some(wi) = mine.clone().min_by_key(|&i| (workers[i].bytes, i)) {
                give(&mut workers, wi, &r);
            }
        }
    }
    for wp in &mut workers {
        wp.ranges.sort_unstable();
    }
    Ok(Plan {
        range_bytes: cfg.range_bytes,
        total_bytes: total,
        lane_nodes: lanes.to_vec(),
        workers,
        cpus,
    })
}

/// Rule 2: how many workers each (CPU-holding) node gets.
fn workers_per_node(
    nodes: &[&super::Node],
    ranges: &[MemRegion],
    lanes: &[Option<NodeId>],
    w: usize,
    total: u64,
    node_index: &dyn Fn(Option<NodeId>) -> Option<usize>,
) -> Vec<usize> {
    let has_lane: Vec<bool> = nodes.iter().map(|n| lanes.contains(&Some(n.id))).collect();
    let cores: Vec<u128> = nodes.iter().map(|n| n.cpus.len() as u128).collect();
    let mut local = vec![0u128; nodes.len()];
    let mut floating = 0u128;
    for r in ranges {
        match node_index(r.node) {
            Some(ni) => local[ni] += r.len as u128,
            None => floating += r.len as u128,
        }
    }
    // Floating memory is spread over the lane nodes (all nodes if none), by CPUs.
    let spread: Vec<bool> = if has_lane.iter().any(|&b| b) {
        has_lane.clone()
    } else {
        vec![true; nodes.len()]
    };
    let spread_cores: u128 = (0..nodes.len())
        .filter(|&i| spread[i])
        .map(|i| cores[i])
        .sum();
    // weight[n] / (total * spread_cores) is node n's share of memory.
    let weight: Vec<u128> = (0..nodes.len())
        .map(|i| local[i] * spread_cores + if spread[i] { floating * cores[i] } else { 0 })
        .collect();
    let all_weight = (total as u128 * spread_cores).max(1);
    let cpus: usize = nodes.iter().map(|n| n.cpus.len()).sum();
    let per_cpu = w.div_ceil(cpus);
    let mut counts = vec![0usize; nodes.len()];
    for _ in 0..w {
        let pick = (0..nodes.len())
            .filter(|&i| counts[i] < nodes[i].cpus.len() * per_cpu)
            .max_by_key(|&i| {
                // Quota minus workers so far, scaled by all_weight.
                let deficit =
                    (w as u128 * weight[i]) as i128 - (counts[i] as u128 * all_weight) as i128;
                let free = nodes[i].cpus.len() * per_cpu - counts[i];
                (deficit, has_lane[i], free, Reverse(i))
            });
        if let Some(i) = pick {
            counts[i] += 1;
        }
    }
    counts
}

/// Bytes as text with a binary unit (`64 MiB`, `1.5 GiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Spans of memory shown per worker by [`Plan::describe`].
const MAX_SPANS: usize = 4;

/// Merges sorted, adjacent ranges into spans for display.
fn spans(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(gpa, len) in ranges {
        match out.last_mut() {
            Some((s, l)) if *s + *l == gpa => *l += len,
            _ => out.push((gpa, len)),
        }
    }
    out
}

impl Plan {
    /// Mean bytes per worker.
    pub fn mean_bytes(&self) -> f64 {
        self.total_bytes as f64 / self.workers.len().max(1) as f64
    }

    /// Bytes sent by a worker on another node than the memory's (known) node.
    pub fn remote_bytes(&self) -> u64 {
        self.workers.iter().map(|w| w.remote_bytes).sum()
    }

    /// Workers whose lane's NIC is on another (known) node than theirs.
    pub fn remote_lane_workers(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| self.lane_nodes[w.lane].is_some_and(|n| n != w.node))
            .count()
    }

    /// Number of ranges.
    pub fn range_count(&self) -> usize {
        self.workers.iter().map(|w| w.ranges.len()).sum()
    }

    /// The plan as human text: a summary line, one line per worker, the locality figures.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let mut nodes: Vec<NodeId> = self.workers.iter().map(|w| w.node).collect();
        nodes.dedup();
        let _ = writeln!(
            s,
            "{} worker{} on {} node{}, {} lane{}; {} in {} ranges of at most {} \
             ({} per worker on average)",
            self.workers.len(),
            if self.workers.len() == 1 { "" } else { "s" },
            nodes.len(),
            if nodes.len() == 1 { "" } else { "s" },
            self.lane_nodes.len(),
            if self.lane_nodes.len() == 1 { "" } else { "s" },
            human_bytes(self.total_bytes),
            self.range_count(),
            human_bytes(self.range_bytes),
            human_bytes(self.mean_bytes().round() as u64),
        );
        if self.workers.len() > self.cpus {
            let _ = writeln!(
                s,
                "  note: {} workers share {} CPUs",
                self.workers.len(),
                self.cpus
            );
        }
        let _ = writeln!(
            s,
            "  {:>6} {:>4} {:>4} {:>10} {:>6} {:>10}  memory",
            "worker", "cpu", "node", "lane", "ranges", "bytes"
        );
        for w in &self.workers {
            let lane = match self.lane_nodes[w.lane] {
                Some(n) => format!("{} (n{n})", w.lane),
                None => format!("{} (n?)", w.lane),
            };
            let spans = spans(&w.ranges);
            let mut mem: Vec<String> = spans
                .iter()
                .take(MAX_SPANS)
                .map(|&(g, l)| format!("{g:#x}+{}", human_bytes(l)))
                .collect();
            if spans.len() > MAX_SPANS {
                mem.push(format!("and {} more", spans.len() - MAX_SPANS));
            }
            let _ = writeln!(
                s,
                "  {:>6} {:>4} {:>4} {:>10} {:>6} {:>10}  {}",
                w.id,
                w.cpu,
                w.node,
                lane,
                w.ranges.len(),
                human_bytes(w.bytes),
                if mem.is_empty() {
                    "-".to_string()
                } else {
                    mem.join(" ")
                }
            );
        }
        let _ = writeln!(
            s,
            "  memory sent from another node: {}; workers sending on another node's NIC: {}",
            human_bytes(self.remote_bytes()),
            self.remote_lane_workers()
        );
        s
    }
}
