//! `ferry topo`: this machine's NUMA nodes, CPUs and NICs, and the placement ferry would use
//! for a guest of a given size over given lanes.
//!
//! Lanes are given as `LOCAL=REMOTE:PORT` (LOCAL: an address of this host or an interface
//! name) or `REMOTE:PORT` (no local binding, so the NIC and its node are unknown). There is
//! no shared lane parser in `opts.rs` yet, so [`parse_lane`] lives here; it only checks the
//! form of `REMOTE:PORT` and never resolves names.

use std::net::IpAddr;

use anyhow::{bail, Context};
use clap::Args;
use ferry_engine::memory::GuestMemory;
use ferry_engine::topo::{self, MemRegion, NodeId, PlanConfig, Topology};
use serde::Serialize;
use serde_json::json;

use crate::opts::parse_size;

#[derive(Args)]
pub struct TopoArgs {
    /// Number of workers (default: one per usable CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Largest range of guest memory a worker takes at once.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    range: u64,
    /// Guest memory size to plan for.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Largest guest memory region (one KVM slot each).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    region: u64,
    /// A lane: LOCAL=REMOTE:PORT (LOCAL an address or interface of this host), or
    /// REMOTE:PORT. Repeat for several; none means one lane without a local binding.
    #[arg(long = "lane", value_parser = parse_lane)]
    lanes: Vec<LaneSpec>,
    /// Print topology, lanes and plan as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Where a lane's local end is bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Local {
    /// An address of this host.
    Addr(IpAddr),
    /// An interface name.
    Interface(String),
}

/// One `--lane`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneSpec {
    /// The local end, if bound.
    pub local: Option<Local>,
    /// The remote end, `HOST:PORT` as given.
    pub remote: String,
}

/// Parses `LOCAL=REMOTE:PORT` or `REMOTE:PORT`.
pub fn parse_lane(s: &str) -> Result<LaneSpec, String> {
    let (local, remote) = match s.split_once('=') {
        Some((l, r)) => (Some(l.trim()), r.trim()),
        None => (None, s.trim()),
    };
    let local = match local {
        None => None,
        Some("") => return Err(format!("{s:?}: LOCAL is empty (use LOCAL=REMOTE:PORT)")),
        Some(l) => Some(match l.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(a) => Local::Addr(a),
            Err(_)
                if l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) =>
            {
                Local::Interface(l.to_string())
            }
            Err(_) => {
                return Err(format!(
                    "{s:?}: LOCAL {l:?} is neither an address nor an interface name"
                ))
            }
        }),
    };
    let (host, port) = remote
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected REMOTE:PORT after '='"))?;
    port.parse::<u16>()
        .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() || (host.starts_with('[') != host.ends_with(']')) {
        return Err(format!("{s:?}: bad remote host {host:?}"));
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(format!("{s:?}: write an IPv6 remote as [ADDR]:PORT"));
    }
    Ok(LaneSpec {
        local,
        remote: remote.to_string(),
    })
}

/// A lane as placed on this host.
#[derive(Serialize)]
struct LaneInfo {
    /// The local end, if bound.
    local: Option<Local>,
    /// `HOST:PORT`; `None` for the default lane shown when no `--lane` is given.
    remote: Option<String>,
    /// The NIC of the local end.
    nic: Option<String>,
    /// That NIC's NUMA node.
    node: Option<NodeId>,
}

fn place_lane(topo: &Topology, spec: &LaneSpec) -> anyhow::Result<LaneInfo> {
    let nic = match &spec.local {
        None => None,
        Some(Local::Addr(a)) => Some(topo.nic_with_addr(*a).with_context(|| {
            format!("lane local address {a} is not an address of any interface here")
        })?),
        Some(Local::Interface(name)) => Some(
            topo.nic(name)
                .with_context(|| format!("lane local interface {name:?} does not exist here"))?,
        ),
    };
    Ok(LaneInfo {
        local: spec.local.clone(),
        remote: Some(spec.remote.clone()),
        nic: nic.map(|n| n.name.clone()),
        node: nic.and_then(|n| n.node.or_else(|| topo.only_node())),
    })
}

pub fn run(a: TopoArgs) -> anyhow::Result<i32> {
    let topo = Topology::discover().context("discovering this host's topology")?;
    let mut lanes: Vec<LaneInfo> = a
        .lanes
        .iter()
        .map(|s| place_lane(&topo, s))
        .collect::<anyhow::Result<_>>()?;
    if lanes.is_empty() {
        // What `ferry migrate` does today: one lane, no local binding.
        lanes.push(LaneInfo {
            local: None,
            remote: None,
            nic: None,
            node: None,
        });
    }
    if a.region == 0 {
        bail!("--region must be more than 0");
    }
    // Where the guest's memory will be is not queried yet: known only on one-node hosts.
    let mem_node = topo.only_node();
    let memory = MemRegion::from_layout(&GuestMemory::simple_layout(a.mem, a.region), mem_node);
    let cfg = PlanConfig {
        workers: a.workers,
        range_bytes: a.range,
    };
    let lane_nodes: Vec<Option<NodeId>> = lanes.iter().map(|l| l.node).collect();
    let plan = topo::plan(&topo, &memory, &lane_nodes, &cfg).context("planning the workers")?;

    if a.json {
        let out = json!({
            "topology": topo,
            "lanes": lanes,
            "memory": memory,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    print!("{topo}");
    println!(
        "{} lane{}",
        lanes.len(),
        if lanes.len() == 1 { "" } else { "s" }
    );
    for (i, l) in lanes.iter().enumerate() {
        let local = match &l.local {
            None => "any local address".to_string(),
            Some(Local::Addr(a)) => a.to_string(),
            Some(Local::Interface(n)) => n.clone(),
        };
        let nic = l.nic.as_deref().unwrap_or("?");
        let node = l.node.map_or("?".to_string(), |n| n.to_string());
        let remote = l
            .remote
            .as_deref()
            .unwrap_or("the destination (no --lane given)");
        println!("  {i}: {local} -> {remote} (NIC {nic}, node {node})");
    }
    let where_ = match mem_node {
        Some(n) => format!("on node {n}"),
        None => "on nodes not known yet".to_string(),
    };
    println!("plan for a guest of {} {where_}:", topo::human_bytes(a.mem));
    print!("{}", plan.describe());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_parse() {
        let l = parse_lane("198.18.0.1=198.18.1.1:7000").unwrap();
        assert_eq!(l.local, Some(Local::Addr(IpAddr::from([198, 18, 0, 1]))));
        assert_eq!(l.remote, "198.18.1.1:7000");
        let l = parse_lane("ib0=dest-host:7000").unwrap();
        assert_eq!(l.local, Some(Local::Interface("ib0".into())));
        let l = parse_lane("[::1]=[::1]:7000").unwrap();
        assert_eq!(l.local, Some(Local::Addr("::1".parse().unwrap())));
        let l = parse_lane("198.18.1.1:7000").unwrap();
        assert_eq!(l.local, None);
        for bad in [
            "=198.18.1.1:7000",
            "eth0=198.18.1.1",
            "eth0=198.18.1.1:x",
            "eth0=:7000",
            "eth0=::1:7000",
            "eth 0=198.18.1.1:7000",
            "eth0=[::1:7000",
        ] {
            assert!(parse_lane(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn lanes_are_placed_on_nics() {
        let topo = Topology::synthetic(2, 2, &[1]);
        let l = place_lane(&topo, &parse_lane("198.18.0.1=198.18.1.1:7000").unwrap()).unwrap();
        assert_eq!((l.nic.as_deref(), l.node), (Some("nic0"), Some(1)));
        let l = place_lane(&topo, &parse_lane("nic0=198.18.1.1:7000").unwrap()).unwrap();
        assert_eq!(l.node, Some(1));
        let l = place_lane(&topo, &parse_lane("198.18.1.1:7000").unwrap()).unwrap();
        assert_eq!((l.nic, l.node), (None, None));
        assert!(place_lane(&topo, &parse_lane("198.18.9.9=198.18.1.1:7000").unwrap()).is_err());
        assert!(place_lane(&topo, &parse_lane("eth9=198.18.1.1:7000").unwrap()).is_err());
    }
}
