//! Tests of the planner: examples, errors, and properties over synthetic topologies.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

fn cfg(workers: Option<usize>, range_bytes: u64) -> PlanConfig {
    PlanConfig {
        workers,
        range_bytes,
    }
}

/// Regions laid out one after another from gpa 0 (with `gap` pages before each).
fn layout(regions: &[(u64, u64, Option<NodeId>)]) -> Vec<MemRegion> {
    let mut gpa = 0;
    regions
        .iter()
        .map(|&(gap, pages, node)| {
            gpa += gap * PAGE;
            let r = MemRegion {
                gpa,
                len: pages * PAGE,
                node,
            };
            gpa += r.len;
            r
        })
        .collect()
}

/// Checks what must hold of every plan; returns each range's worker.
fn check_plan(
    topo: &Topology,
    mem: &[MemRegion],
    lanes: &[Option<NodeId>],
    p: &Plan,
) -> BTreeMap<u64, usize> {
    let ranges = split_ranges(mem, p.range_bytes).unwrap();
    let w = p.workers.len() as u64;
    // Every range is given to exactly one worker.
    let mut owner = BTreeMap::new();
    for wp in &p.workers {
        assert_eq!(wp.bytes, wp.ranges.iter().map(|r| r.1).sum::<u64>());
        for &(gpa, _) in &wp.ranges {
            assert!(
                owner.insert(gpa, wp.id).is_none(),
                "range {gpa:#x} given twice"
            );
        }
    }
    let mut planned: Vec<(u64, u64)> = p.workers.iter().flat_map(|w| w.ranges.clone()).collect();
    planned.sort_unstable();
    let expected: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
    assert_eq!(planned, expected);
    // Balance: within one range of the mean.
    let max_len = ranges.iter().map(|r| r.len).max().unwrap();
    for wp in &p.workers {
        let dev = (wp.bytes * w).abs_diff(p.total_bytes);
        assert!(
            dev <= max_len * w,
            "worker {} holds {} bytes, mean {}, range {max_len}",
            wp.id,
            wp.bytes,
            p.mean_bytes()
        );
    }
    // CPUs on the worker's node; distinct while there are enough.
    let mut used = std::collections::BTreeSet::new();
    for wp in &p.workers {
        assert_eq!(wp.id, used.len());
        assert!(topo.node(wp.node).unwrap().cpus.contains(&wp.cpu));
        if p.workers.len() <= topo.cpu_count() {
            assert!(used.insert(wp.cpu), "CPU {} used twice", wp.cpu);
        } else {
            used.insert(wp.id);
        }
    }
    // Lanes: on the worker's node when it has one.
    for wp in &p.workers {
        assert!(wp.lane < lanes.len());
        if lanes.contains(&Some(wp.node)) {
            assert_eq!(
                lanes[wp.lane],
                Some(wp.node),
                "worker {} off-node lane",
                wp.id
            );
        }
    }
    // Memory leaves its node only when that node's workers are full.
    let node_bytes = |n: NodeId| -> (u64, u64) {
        let on: Vec<&WorkerPlan> = p.workers.iter().filter(|w| w.node == n).collect();
        (on.len() as u64, on.iter().map(|w| w.bytes).sum())
    };
    for r in &ranges {
        let wp = &p.workers[owner[&r.gpa]];
        if let Some(n) = r.node {
            let (k, bytes) = node_bytes(n);
            if wp.node != n && k > 0 {
                assert!(
                    (bytes + r.len) * w > k * p.total_bytes,
                    "range {:#x} of node {n} left it while its {k} workers hold {bytes}",
                    r.gpa
                );
            }
        }
    }
    let remote: u64 = ranges
        .iter()
        .filter(|r| r.node.is_some_and(|n| n != p.workers[owner[&r.gpa]].node))
        .map(|r| r.len)
        .sum();
    assert_eq!(remote, p.remote_bytes());
    owner
}

#[test]
fn this_machine_shape() {
    let topo = Topology::synthetic(1, 2, &[]);
    let mem = MemRegion::from_layout(&[(0, 256 * MIB)], Some(0));
    let p = plan(&topo, &mem, &[None], &PlanConfig::default()).unwrap();
    check_plan(&topo, &mem, &[None], &p);
    assert_eq!(p.workers.len(), 2);
    assert_eq!(p.workers[0].cpu, 0);
    assert_eq!(p.workers[1].cpu, 1);
    assert!(p
        .workers
        .iter()
        .all(|w| w.bytes == 128 * MIB && w.lane == 0));
    assert_eq!(p.range_count(), 4);
    assert_eq!(
        p.workers[0].ranges,
        [(0, 64 * MIB), (64 * MIB, 64 * MIB)],
        "contiguous"
    );
    let text = p.describe();
    assert!(
        text.starts_with("2 workers on 1 node, 1 lane; 256 MiB in 4 ranges"),
        "{text}"
    );
    assert!(
        text.contains("memory sent from another node: 0 B"),
        "{text}"
    );
}

#[test]
fn two_nodes_memory_and_nics_on_each() {
    // Node 0: CPUs 0-3, NIC 0; node 1: CPUs 4-7, NICs 1 and 2.
    let topo = Topology::synthetic(2, 4, &[0, 1, 1]);
    let lanes = [Some(0), Some(1), Some(1)];
    let mem = vec![
        MemRegion {
            gpa: 0,
            len: 1 << 30,
            node: Some(0),
        },
        MemRegion {
            gpa: 1 << 32,
            len: 1 << 30,
            node: Some(1),
        },
    ];
    let p = plan(&topo, &mem, &lanes, &cfg(Some(4), 64 * MIB)).unwrap();
    let owner = check_plan(&topo, &mem, &lanes, &p);
    let nodes: Vec<NodeId> = p.workers.iter().map(|w| w.node).collect();
    assert_eq!(nodes, [0, 0, 1, 1]);
    let cpus: Vec<usize> = p.workers.iter().map(|w| w.cpu).collect();
    assert_eq!(cpus, [0, 1, 4, 5]);
    let lanes_used: Vec<usize> = p.workers.iter().map(|w| w.lane).collect();
    assert_eq!(lanes_used, [0, 0, 1, 2], "round-robin among node 1's lanes");
    assert!(p.workers.iter().all(|w| w.bytes == 512 * MIB));
    assert_eq!(p.remote_bytes(), 0);
    assert_eq!(p.workers[owner[&(1 << 32)]].node, 1);
}

#[test]
fn skewed_memory_spills_at_most_what_balance_needs() {
    // 3 GiB on node 0, 1 GiB on node 1, 2 CPUs each: node 0 gets its 2 workers' share.
    let topo = Topology::synthetic(2, 2, &[0, 1]);
    let lanes = [Some(0), Some(1)];
    let mem = vec![
        MemRegion {
            gpa: 0,
            len: 3 << 30,
            node: Some(0),
        },
        MemRegion {
            gpa: 3 << 30,
            len: 1 << 30,
            node: Some(1),
        },
    ];
    let p = plan(&topo, &mem, &lanes, &PlanConfig::default()).unwrap();
    check_plan(&topo, &mem, &lanes, &p);
    assert!(p.workers.iter().all(|w| w.bytes == 1 << 30));
    assert_eq!(p.remote_bytes(), 1 << 30);
    assert_eq!(p.remote_lane_workers(), 0);
}

#[test]
fn nodes_without_nics_or_cpus() {
    // Node 1 has no NIC; node 2 has no CPU but holds memory; lane 1 is of unknown node.
    let mut topo = Topology::synthetic(3, 2, &[0]);
    topo.nodes[2].cpus.clear();
    let lanes = [Some(0), None];
    let mem = layout(&[(0, 1000, Some(1)), (5, 1000, Some(2)), (0, 1000, None)]);
    let p = plan(&topo, &mem, &lanes, &cfg(None, 64 * PAGE)).unwrap();
    check_plan(&topo, &mem, &lanes, &p);
    assert_eq!(p.workers.len(), 4);
    for w in &p.workers {
        let want = if w.node == 0 { 0 } else { 1 };
        assert_eq!(
            w.lane, want,
            "node 1 falls back to the lane of unknown node"
        );
    }
}

#[test]
fn more_workers_than_cpus_share_them() {
    let topo = Topology::synthetic(1, 2, &[0]);
    let mem = MemRegion::from_layout(&[(0, 64 * MIB)], Some(0));
    let p = plan(&topo, &mem, &[Some(0)], &cfg(Some(5), 4 * MIB)).unwrap();
    check_plan(&topo, &mem, &[Some(0)], &p);
    let cpus: Vec<usize> = p.workers.iter().map(|w| w.cpu).collect();
    assert_eq!(cpus, [0, 1, 0, 1, 0]);
    assert!(p.describe().contains("note: 5 workers share 2 CPUs"));
}

#[test]
fn bad_inputs_are_refused() {
    let topo = Topology::synthetic(1, 2, &[]);
    let mem = MemRegion::from_layout(&[(0, MIB)], None);
    let d = PlanConfig::default();
    assert_eq!(plan(&topo, &mem, &[], &d), Err(PlanError::NoLanes));
    assert_eq!(plan(&topo, &[], &[None], &d), Err(PlanError::NoMemory));
    assert_eq!(
        plan(&topo, &mem, &[None], &cfg(Some(0), MIB)),
        Err(PlanError::ZeroWorkers)
    );
    for range_bytes in [0, 1000, PAGE + 1] {
        assert_eq!(
            plan(&topo, &mem, &[None], &cfg(None, range_bytes)),
            Err(PlanError::RangeSize { range_bytes })
        );
    }
    let no_cpus = Topology {
        nodes: vec![Node {
            id: 0,
            cpus: vec![],
            mem_bytes: None,
        }],
        nics: vec![],
    };
    assert_eq!(plan(&no_cpus, &mem, &[None], &d), Err(PlanError::NoCpus));
    let bad = |regions: &[(u64, u64)]| {
        let e = split_ranges(&MemRegion::from_layout(regions, None), MIB).unwrap_err();
        assert!(matches!(e, PlanError::Region { .. }), "{e}");
        e.to_string()
    };
    assert!(bad(&[(0, 0)]).contains("empty"));
    assert!(bad(&[(100, PAGE)]).contains("aligned"));
    assert!(bad(&[(0, 100)]).contains("aligned"));
    assert!(bad(&[(2 * PAGE, PAGE), (0, 4 * PAGE)]).contains("overlaps"));
    assert!(bad(&[(u64::MAX - PAGE + 1, PAGE)]).contains("overflows"));
}

#[test]
fn human_text() {
    let t = Topology::synthetic(2, 2, &[1]);
    let text = t.to_string();
    assert!(text.contains("2 NUMA nodes, 4 usable CPUs"), "{text}");
    assert!(text.contains("node 1: CPUs 2-3 (2)"), "{text}");
    assert!(text.contains("nic0  node 1   198.18.0.1"), "{text}");
    assert_eq!(human_bytes(1536 * MIB), "1.5 GiB");
    assert_eq!(human_bytes(4096), "4 KiB");
    assert_eq!(human_bytes(12), "12 B");
}

fn regions_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..4, 1u64..200), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Ranges cover every page exactly once, never cross a region, are aligned and short.
    #[test]
    fn split_covers_each_page_once(regions in regions_strategy(), range_pages in 1u64..40) {
        let mem = layout(&regions.iter().map(|&(g, p)| (g, p, None)).collect::<Vec<_>>());
        let range = range_pages * PAGE;
        let ranges = split_ranges(&mem, range).unwrap();
        let mut i = 0;
        for r in &mem {
            // The ranges inside r tile it from its start to its end, in order.
            let mut at = r.gpa;
            while at < r.gpa + r.len {
                let x = ranges[i];
                prop_assert_eq!(x.gpa, at);
                prop_assert!(x.len > 0 && x.len <= range);
                prop_assert_eq!(x.gpa % PAGE, 0);
                prop_assert_eq!(x.len % PAGE, 0);
                prop_assert!(x.gpa + x.len <= r.gpa + r.len, "crosses the region's end");
                at += x.len;
                i += 1;
            }
        }
        prop_assert_eq!(i, ranges.len());
    }

    /// Any memory and NIC placement on 2 or 4 nodes: coverage, balance, CPUs, lanes, and
    /// memory leaving its node only when that node is full.
    #[test]
    fn any_placement_holds_the_rules(
        four in any::<bool>(),
        cpus_per_node in 1usize..4,
        nic_nodes in prop::collection::vec(0u32..4, 0..5),
        unknown_lanes in 0usize..2,
        regions in prop::collection::vec((0u64..3, 1u64..300, prop::option::weighted(0.8, 0u32..4)), 1..8),
        workers in prop::option::of(1usize..20),
        range_pages in 1u64..64,
    ) {
        let n = if four { 4 } else { 2 };
        let nic_nodes: Vec<NodeId> = nic_nodes.into_iter().map(|x| x % n).collect();
        let topo = Topology::synthetic(n, cpus_per_node, &nic_nodes);
        let mut lanes: Vec<Option<NodeId>> = nic_nodes.iter().map(|&x| Some(x)).collect();
        lanes.extend(std::iter::repeat_n(None, unknown_lanes.max(usize::from(lanes.is_empty()))));
        let mem = layout(&regions.iter().map(|&(g, p, node)| (g, p, node.map(|x| x % n))).collect::<Vec<_>>());
        let p = plan(&topo, &mem, &lanes, &cfg(workers, range_pages * PAGE)).unwrap();
        prop_assert_eq!(p.workers.len(), workers.unwrap_or(n as usize * cpus_per_node));
        check_plan(&topo, &mem, &lanes, &p);
    }

    /// Memory spread evenly over 2 or 4 nodes, as many workers on each: every worker, its
    /// memory and (when its node has one) its NIC are on one node.
    #[test]
    fn even_memory_stays_on_its_node(
        four in any::<bool>(),
        cpus_per_node in 1usize..5,
        per_node in 1usize..5,
        nic_mask in 1u32..16,
        sizes in prop::collection::vec((0u64..3, 1u64..200), 1..5),
        order_seed in any::<u64>(),
        range_pages in 1u64..64,
    ) {
        let n = if four { 4 } else { 2 };
        let per_node = per_node.min(cpus_per_node);
        let nic_nodes: Vec<NodeId> = (0..n).filter(|x| nic_mask & (1 << x) != 0).collect();
        let nic_nodes = if nic_nodes.is_empty() { vec![0] } else { nic_nodes };
        let topo = Topology::synthetic(n, cpus_per_node, &nic_nodes);
        let lanes: Vec<Option<NodeId>> = nic_nodes.iter().map(|&x| Some(x)).collect();
        // The same region sizes on every node, in a shuffled address order.
        let mut list: Vec<(u64, u64, Option<NodeId>)> = (0..n)
            .flat_map(|node| sizes.iter().map(move |&(g, p)| (g, p, Some(node))))
            .collect();
        let mut seed = order_seed | 1;
        for i in (1..list.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            list.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let mem = layout(&list);
        let workers = n as usize * per_node;
        let p = plan(&topo, &mem, &lanes, &cfg(Some(workers), range_pages * PAGE)).unwrap();
        let owner = check_plan(&topo, &mem, &lanes, &p);
        for node in 0..n {
            prop_assert_eq!(p.workers.iter().filter(|w| w.node == node).count(), per_node);
        }
        for r in split_ranges(&mem, p.range_bytes).unwrap() {
            let wp = &p.workers[owner[&r.gpa]];
            prop_assert_eq!(Some(wp.node), r.node, "range {:#x} left its node", r.gpa);
            if nic_nodes.contains(&wp.node) {
                prop_assert_eq!(lanes[wp.lane], Some(wp.node));
            }
        }
        prop_assert_eq!(p.remote_bytes(), 0);
    }
}
