//! Host topology and worker placement for the parallel data path.
//!
//! Three parts, kept apart so the decisions can be tested without a machine (STYLE 1):
//!
//! - [`Topology`]: NUMA nodes, the CPUs of each, and each NIC's NUMA node and addresses.
//!   [`Topology::discover`] reads it from the running Linux host; tests build it by hand.
//! - [`plan()`]: a pure function from a topology, a guest memory layout and the lanes to a
//!   [`Plan`]: which worker runs on which CPU, sends on which lane, and owns which ranges of
//!   guest memory. Its rules are documented on [`plan()`].
//! - [`pin_current_thread`]: pins the calling thread to one CPU (the mechanism that carries a
//!   [`WorkerPlan::cpu`] out).
//!
//! # Why sysfs and not hwloc
//!
//! The design card names the `hwloc2` crate. Discovery reads Linux sysfs directly instead
//! (`/sys/devices/system/node/node*/{cpulist,meminfo}`, `/sys/devices/system/cpu/online`,
//! `/sys/devices/system/cpu/cpu*/topology/`, `/sys/class/net/*/device/numa_node`) and takes
//! interface addresses from `getifaddrs(3)`:
//!
//! - ferry needs three facts (node → CPUs, node → memory size, NIC → node); sysfs states each
//!   of them in one small file, which is what hwloc itself reads on Linux.
//! - No system library: `hwloc2` links `libhwloc` (`libhwloc-dev` and pkg-config at build
//!   time), which a fresh machine or CI image does not have; sysfs needs nothing.
//! - `hwloc2` 2.2.0 panics on `objects_with_type(NUMANode)`, because hwloc 2 puts NUMA nodes
//!   at a special (negative) depth the crate does not expect; working around it means walking
//!   memory children or nodesets by hand, more code than reading sysfs.
//! - The sysfs root is a parameter ([`Topology::from_sysfs`]), so discovery is tested against
//!   a fake tree with several nodes and NICs on a one-node machine.
//!
//! The cost: Linux only (ferry is KVM-only anyway), and no cache or package hierarchy beyond
//! what the placement rules use (SMT siblings, read from `core_id`).

mod discover;
mod pin;
mod plan;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use discover::{format_cpulist, parse_cpulist};
pub use pin::{
    current_affinity, online_cpus, pin_current_thread, set_thread_affinity, thread_affinity,
};
pub use plan::{
    human_bytes, plan, split_ranges, MemRegion, Plan, PlanConfig, PlanError, WorkerPlan,
    DEFAULT_RANGE_BYTES,
};

/// A NUMA node id, as the kernel numbers them (`nodeN`).
pub type NodeId = u32;

/// The host: its NUMA nodes and its network interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// NUMA nodes, sorted by id. A machine without NUMA has one node, 0.
    pub nodes: Vec<Node>,
    /// Network interfaces, sorted by name.
    pub nics: Vec<Nic>,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Kernel node id.
    pub id: NodeId,
    /// CPUs of this node that are online and that this process may run on, in placement
    /// order: one logical CPU of each physical core first, then their SMT siblings. The
    /// planner takes CPUs in this order, so workers land on distinct physical cores first.
    pub cpus: Vec<usize>,
    /// Memory attached to the node (`MemTotal` of its `meminfo`), if known.
    pub mem_bytes: Option<u64>,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Interface name (`eth0`, `ib0`).
    pub name: String,
    /// NUMA node of the device, `None` when the kernel does not know (virtual interfaces,
    /// `numa_node` of −1, single-node machines).
    pub node: Option<NodeId>,
    /// Its addresses: IPv4, and IPv6 other than link-local (a lane cannot bind to those
    /// without a scope).
    pub addrs: Vec<IpAddr>,
}

/// Errors discovering the topology or pinning a thread.
#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    /// Reading a sysfs file or directory failed.
    #[error("reading {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs file did not hold what the kernel documents.
    #[error("{path}: cannot parse {text:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its content (trimmed).
        text: String,
    },
    /// `getifaddrs` failed.
    #[error("listing interface addresses (getifaddrs)")]
    Addrs(#[source] std::io::Error),
    /// The CPU is not online.
    #[error("cannot pin to CPU {cpu}: it is not online (online: {online})")]
    CpuOffline {
        /// The CPU asked for.
        cpu: usize,
        /// The online CPUs, as a cpulist.
        online: String,
    },
    /// `sched_setaffinity` refused (the CPU is outside this process's cpuset).
    #[error("pinning the current thread to CPU {cpu} (sched_setaffinity refused; outside this process's cpuset?)")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
    },
    /// `sched_getaffinity` failed.
    #[error("reading the current thread's affinity (sched_getaffinity)")]
    Affinity(#[source] std::io::Error),
}

impl Topology {
    /// Reads the running host's topology from `/sys` and `getifaddrs`.
    pub fn discover() -> Result<Self, TopoError> {
        let allowed = current_affinity().ok();
        let addrs = discover::interface_addrs()?;
        Self::from_sysfs(std::path::Path::new("/sys"), allowed.as_deref(), &addrs)
    }

    /// Reads the topology from a sysfs tree rooted at `sys` (normally `/sys`).
    ///
    /// `allowed`, if given, restricts each node's CPUs to those (the process's affinity
    /// mask); `addrs` gives each interface's addresses by name.
    pub fn from_sysfs(
        sys: &std::path::Path,
        allowed: Option<&[usize]>,
        addrs: &std::collections::BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<Self, TopoError> {
        discover::from_sysfs(sys, allowed, addrs)
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// All usable CPUs, over every node.
    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }

    /// The interface with this name.
    pub fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics.iter().find(|n| n.name == name)
    }

    /// The interface that holds this address.
    pub fn nic_with_addr(&self, addr: IpAddr) -> Option<&Nic> {
        self.nics.iter().find(|n| n.addrs.contains(&addr))
    }

    /// The NUMA node of the NIC holding `addr`; `None` if no NIC holds it or its node is
    /// unknown. On a one-node machine every address is on that node.
    pub fn node_of_addr(&self, addr: IpAddr) -> Option<NodeId> {
        let nic = self.nic_with_addr(addr)?;
        nic.node.or_else(|| self.only_node())
    }

    /// The id of the only node, on a machine with one.
    pub fn only_node(&self) -> Option<NodeId> {
        match self.nodes.as_slice() {
            [n] => Some(n.id),
            _ => None,
        }
    }

    /// A synthetic topology for tests and examples: `nodes` nodes of `cpus_per_node` CPUs
    /// each (numbered consecutively), and one NIC `nicK` on each node listed in `nic_nodes`.
    pub fn synthetic(nodes: u32, cpus_per_node: usize, nic_nodes: &[NodeId]) -> Self {
        Topology {
            nodes: (0..nodes)
                .map(|id| Node {
                    id,
                    cpus: (0..cpus_per_node)
                        .map(|c| id as usize * cpus_per_node + c)
                        .collect(),
                    mem_bytes: None,
                })
                .collect(),
            nics: nic_nodes
                .iter()
                .enumerate()
                .map(|(k, &node)| Nic {
                    name: format!("nic{k}"),
                    node: Some(node),
                    addrs: vec![IpAddr::from([198, 18, k as u8, 1])],
                })
                .collect(),
        }
    }
}

impl fmt::Display for Topology {
    /// Human text: one line per node, one per NIC.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        writeln!(
            f,
            "{} NUMA node{}, {} usable CPU{}",
            self.nodes.len(),
            plural(self.nodes.len()),
            self.cpu_count(),
            plural(self.cpu_count())
        )?;
        for n in &self.nodes {
            let mem = n.mem_bytes.map(human_bytes).unwrap_or_else(|| "?".into());
            writeln!(
                f,
                "  node {}: CPUs {} ({}), memory {}",
                n.id,
                if n.cpus.is_empty() {
                    "none".to_string()
                } else {
                    format_cpulist(&n.cpus)
                },
                n.cpus.len(),
                mem
            )?;
        }
        writeln!(
            f,
            "{} network interface{}",
            self.nics.len(),
            plural(self.nics.len())
        )?;
        let width = self.nics.iter().map(|n| n.name.len()).max().unwrap_or(0);
        for nic in &self.nics {
            let node = match nic.node {
                Some(n) => format!("node {n}"),
                None => "node ?".into(),
            };
            let addrs: Vec<String> = nic.addrs.iter().map(|a| a.to_string()).collect();
            let addrs = if addrs.is_empty() {
                "no address".to_string()
            } else {
                addrs.join(", ")
            };
            writeln!(f, "  {:width$}  {node:8} {addrs}", nic.name)?;
        }
        Ok(())
    }
}
