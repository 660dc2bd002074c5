//! Reading the topology from Linux sysfs and `getifaddrs`.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::{Nic, Node, NodeId, TopoError, Topology};

/// Parses a kernel CPU list (`0-3,8,10-11`; empty means none). `None` if malformed.
pub fn parse_cpulist(text: &str) -> Option<Vec<usize>> {
    let text = text.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Formats CPUs as a kernel CPU list (`0-3,8,10-11`), sorted.
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

fn read(path: &Path) -> Result<String, TopoError> {
    std::fs::read_to_string(path).map_err(|source| TopoError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads `path`, `Ok(None)` if it does not exist.
fn read_opt(path: &Path) -> Result<Option<String>, TopoError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopoError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse_err(path: &Path, text: &str) -> TopoError {
    TopoError::Parse {
        path: path.to_owned(),
        text: text.trim().to_string(),
    }
}

fn read_cpulist(path: &Path) -> Result<Vec<usize>, TopoError> {
    let text = read(path)?;
    parse_cpulist(&text).ok_or_else(|| parse_err(path, &text))
}

/// Names in `dir`, `Ok(None)` if it does not exist.
fn list_dir(dir: &Path) -> Result<Option<Vec<String>>, TopoError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TopoError::Read {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| TopoError::Read {
            path: dir.to_owned(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(Some(names))
}

/// `MemTotal` of a node's `meminfo` (`Node 0 MemTotal:  16343736 kB`), in bytes.
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains("MemTotal:"))?;
    let rest = line.split("MemTotal:").nth(1)?.trim();
    let kib: u64 = rest.trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Orders CPUs for placement: the first logical CPU of each physical core (by CPU number),
/// then the second of each, and so on. `core_of` gives a CPU's `(package, core)` if known.
fn spread_order(cpus: &[usize], core_of: impl Fn(usize) -> Option<(u64, u64)>) -> Vec<usize> {
    let mut seen: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let mut ranked: Vec<(usize, usize)> = cpus
        .iter()
        .map(|&cpu| {
            let rank = match core_of(cpu) {
                Some(core) => {
                    let n = seen.entry(core).or_insert(0);
                    *n += 1;
                    *n - 1
                }
                None => 0,
            };
            (rank, cpu)
        })
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, cpu)| cpu).collect()
}

pub(super) fn from_sysfs(
    sys: &Path,
    allowed: Option<&[usize]>,
    addrs: &BTreeMap<String, Vec<IpAddr>>,
) -> Result<Topology, TopoError> {
    let cpu_dir = sys.join("devices/system/cpu");
    let online = read_cpulist(&cpu_dir.join("online"))?;
    let usable = |cpu: &usize| online.contains(cpu) && allowed.is_none_or(|a| a.contains(cpu));
    let core_of = |cpu: usize| {
        let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
        let num = |f: &str| -> Option<u64> {
            std::fs::read_to_string(topo.join(f))
                .ok()?
                .trim()
                .parse::<i64>()
                .ok()
                .map(|v| v as u64)
        };
        Some((num("physical_package_id").unwrap_or(0), num("core_id")?))
    };

    let node_dir = sys.join("devices/system/node");
    let mut nodes = Vec::new();
    match list_dir(&node_dir)? {
        // A kernel without CONFIG_NUMA: one node holding every CPU.
        None => {
            let cpus: Vec<usize> = online.iter().copied().filter(usable).collect();
            nodes.push(Node {
                id: 0,
                cpus: spread_order(&cpus, core_of),
                mem_bytes: None,
            });
        }
        Some(names) => {
            for name in names {
                let Some(id) = name
                    .strip_prefix("node")
                    .and_then(|s| s.parse::<NodeId>().ok())
                else {
                    continue;
                };
                let dir = node_dir.join(&name);
                let cpus: Vec<usize> = read_cpulist(&dir.join("cpulist"))?
                    .into_iter()
                    .filter(usable)
                    .collect();
                let mem_bytes = read_opt(&dir.join("meminfo"))?
                    .as_deref()
                    .and_then(parse_meminfo_total);
                nodes.push(Node {
                    id,
                    cpus: spread_order(&cpus, core_of),
                    mem_bytes,
                });
            }
            nodes.sort_by_key(|n| n.id);
        }
    }

    let net_dir = sys.join("class/net");
    let mut nics = Vec::new();
    for name in list_dir(&net_dir)?.unwrap_or_default() {
        let path: PathBuf = net_dir.join(&name).join("device/numa_node");
        let node = match read_opt(&path)? {
            None => None,
            Some(text) => {
                let v: i64 = text.trim().parse().map_err(|_| parse_err(&path, &text))?;
                NodeId::try_from(v).ok()
            }
        };
        nics.push(Nic {
            addrs: addrs.get(&name).cloned().unwrap_or_default(),
            name,
            node,
        });
    }
    Ok(Topology { nodes, nics })
}

/// Frees a `getifaddrs` list when dropped.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: self.0 came from a successful getifaddrs and is freed only here, once.
        unsafe { libc::freeifaddrs(self.0) }
    }
}

/// Each interface's IPv4 and non-link-local IPv6 addresses, by interface name.
pub(super) fn interface_addrs() -> Result<BTreeMap<String, Vec<IpAddr>>, TopoError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head to the valid out-pointer we pass.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(TopoError::Addrs(io::Error::last_os_error()));
    }
    let list = IfAddrs(head);
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut cur = list.0;
    while !cur.is_null() {
        // SAFETY: cur is a non-null node of the list getifaddrs returned, alive until `list`
        // is dropped at the end of this function.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a non-null NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr at least as large as its
        // family's structure (getifaddrs allocates it for that family).
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: the family is AF_INET, so ifa_addr points to a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: the family is AF_INET6, so ifa_addr points to a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if a.segments()[0] & 0xffc0 == 0xfe80 {
                    continue;
                }
                IpAddr::V6(a)
            }
            _ => {
                out.entry(name).or_default();
                continue;
            }
        };
        out.entry(name).or_default().push(addr);
    }
    drop(list);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse_and_format() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("\n"), Some(vec![]));
        assert_eq!(parse_cpulist("3,1"), Some(vec![1, 3]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("a"), None);
        assert_eq!(parse_cpulist("0-"), None);
        assert_eq!(format_cpulist(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[5]), "5");
        assert_eq!(format_cpulist(&[]), "");
    }

    #[test]
    fn meminfo_total() {
        let text = "Node 1 MemTotal:       16343736 kB\nNode 1 MemFree: 1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(16343736 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
    }

    #[test]
    fn smt_siblings_go_last() {
        // CPUs 0-3 on cores 0,1,0,1 (siblings 0/2 and 1/3).
        let order = spread_order(&[0, 1, 2, 3], |c| Some((0, c as u64 % 2)));
        assert_eq!(order, vec![0, 1, 2, 3]);
        // Siblings numbered next to each other: 0/1 and 2/3.
        let order = spread_order(&[0, 1, 2, 3], |c| Some((0, c as u64 / 2)));
        assert_eq!(order, vec![0, 2, 1, 3]);
        let order = spread_order(&[4, 5], |_| None);
        assert_eq!(order, vec![4, 5]);
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn fake_sysfs_two_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "devices/system/cpu/online", "0-7\n");
        write(root, "devices/system/node/node0/cpulist", "0-3\n");
        write(root, "devices/system/node/node1/cpulist", "4-7\n");
        write(
            root,
            "devices/system/node/node0/meminfo",
            "Node 0 MemTotal: 1024 kB\n",
        );
        write(root, "devices/system/node/possible", "0-1\n");
        for cpu in 0..8 {
            // Siblings numbered next to each other.
            let t = format!("devices/system/cpu/cpu{cpu}/topology/");
            write(root, &(t.clone() + "core_id"), &format!("{}\n", cpu / 2));
            write(
                root,
                &(t + "physical_package_id"),
                &format!("{}\n", cpu / 4),
            );
        }
        write(root, "class/net/ib0/device/numa_node", "1\n");
        write(root, "class/net/eth0/device/numa_node", "-1\n");
        std::fs::create_dir_all(root.join("class/net/lo")).unwrap();
        let mut addrs = BTreeMap::new();
        addrs.insert("ib0".to_string(), vec![IpAddr::from([198, 18, 0, 1])]);

        let allowed = [0, 1, 2, 3, 4, 5, 6];
        let t = from_sysfs(root, Some(&allowed), &addrs).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].id, 0);
        assert_eq!(t.nodes[0].cpus, vec![0, 2, 1, 3]);
        assert_eq!(t.nodes[0].mem_bytes, Some(1 << 20));
        assert_eq!(t.nodes[1].cpus, vec![4, 6, 5], "CPU 7 is not allowed");
        assert_eq!(t.nodes[1].mem_bytes, None);
        let names: Vec<&str> = t.nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eth0", "ib0", "lo"]);
        assert_eq!(t.nic("eth0").unwrap().node, None, "-1 is unknown");
        assert_eq!(t.nic("lo").unwrap().node, None, "no device is unknown");
        assert_eq!(t.nic("ib0").unwrap().node, Some(1));
        assert_eq!(t.node_of_addr(IpAddr::from([198, 18, 0, 1])), Some(1));
        assert_eq!(t.node_of_addr(IpAddr::from([198, 18, 0, 2])), None);
    }

    #[test]
    fn fake_sysfs_without_numa() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "devices/system/cpu/online", "0-1\n");
        let t = from_sysfs(dir.path(), None, &BTreeMap::new()).unwrap();
        assert_eq!(t.nodes.len(), 1);
        assert_eq!(t.nodes[0].cpus, vec![0, 1]);
        assert!(t.nics.is_empty());
    }

    #[test]
    fn fake_sysfs_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "devices/system/cpu/online", "zero\n");
        let e = from_sysfs(dir.path(), None, &BTreeMap::new()).unwrap_err();
        assert!(matches!(e, TopoError::Parse { .. }), "{e}");
    }

    #[test]
    fn this_host() {
        let t = Topology::discover().unwrap();
        assert!(!t.nodes.is_empty());
        assert!(t.cpu_count() >= 1);
        assert!(
            t.nic("lo").is_some(),
            "every Linux network namespace has lo"
        );
    }
}
