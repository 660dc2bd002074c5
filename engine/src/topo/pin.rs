//! Pinning threads to CPUs.

use std::io;

use super::{format_cpulist, TopoError};

/// The CPUs the calling thread may run on (`sched_getaffinity`), sorted.
pub fn current_affinity() -> Result<Vec<usize>, TopoError> {
    let mut set = empty_set();
    // SAFETY: we pass the size of `set` and a valid pointer to it; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(TopoError::Affinity(io::Error::last_os_error()));
    }
    Ok(set_to_cpus(&set))
}

/// The CPUs another thread of this process may run on (`pthread_getaffinity_np`), sorted.
/// `thread` must be a thread that has not been joined yet.
pub fn thread_affinity(thread: libc::pthread_t) -> Result<Vec<usize>, TopoError> {
    let mut set = empty_set();
    // SAFETY: `thread` is a live (not yet joined) thread of this process, as documented; we
    // pass the size of `set` and a valid pointer to it.
    let rc = unsafe { libc::pthread_getaffinity_np(thread, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(TopoError::Affinity(io::Error::from_raw_os_error(rc)));
    }
    Ok(set_to_cpus(&set))
}

/// Lets another thread of this process run only on `cpus` (`pthread_setaffinity_np`).
/// `thread` must be a thread that has not been joined yet.
pub fn set_thread_affinity(thread: libc::pthread_t, cpus: &[usize]) -> Result<(), TopoError> {
    let mut set = empty_set();
    let max = 8 * std::mem::size_of_val(&set);
    for &cpu in cpus {
        if cpu >= max {
            return Err(TopoError::Pin { cpu });
        }
        // SAFETY: CPU_SET writes bit `cpu` of `set`, and cpu < max is inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `thread` is a live (not yet joined) thread of this process, as documented; we
    // pass the size of `set` and a valid pointer to it.
    let rc = unsafe { libc::pthread_setaffinity_np(thread, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(TopoError::Affinity(io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn empty_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bitmask; all-zero is a valid (empty) set.
    unsafe { std::mem::zeroed() }
}

fn set_to_cpus(set: &libc::cpu_set_t) -> Vec<usize> {
    let max = 8 * std::mem::size_of_val(set);
    // SAFETY: CPU_ISSET reads bit `cpu` of `set`; every cpu < max is inside the set.
    (0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect()
}

/// The CPUs that are online (`/sys/devices/system/cpu/online`).
pub fn online_cpus() -> Result<Vec<usize>, TopoError> {
    let path = std::path::Path::new("/sys/devices/system/cpu/online");
    let text = std::fs::read_to_string(path).map_err(|source| TopoError::Read {
        path: path.to_owned(),
        source,
    })?;
    super::parse_cpulist(&text).ok_or_else(|| TopoError::Parse {
        path: path.to_owned(),
        text: text.trim().to_string(),
    })
}

/// Pins the calling thread to `cpu` (through `core_affinity`).
///
/// The CPU must be online, else [`TopoError::CpuOffline`] names those that are; the kernel
/// still refuses a CPU outside this process's cpuset ([`TopoError::Pin`]). Pinning a thread
/// again moves it.
pub fn pin_current_thread(cpu: usize) -> Result<(), TopoError> {
    let online = online_cpus()?;
    if !online.contains(&cpu) {
        return Err(TopoError::CpuOffline {
            cpu,
            online: format_cpulist(&online),
        });
    }
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        Ok(())
    } else {
        Err(TopoError::Pin { cpu })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_to_an_online_cpu() {
        // In a fresh thread, so the test harness's threads keep their mask.
        std::thread::spawn(|| {
            let before = current_affinity().unwrap();
            let cpu = *before.last().expect("this thread may run somewhere");
            pin_current_thread(cpu).unwrap();
            assert_eq!(current_affinity().unwrap(), vec![cpu]);
            // Pinning again to the same CPU is fine.
            pin_current_thread(cpu).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn refuses_an_offline_cpu_and_moves_a_pinned_thread() {
        std::thread::spawn(|| {
            let e = pin_current_thread(1 << 20).unwrap_err();
            assert!(
                matches!(e, TopoError::CpuOffline { cpu, .. } if cpu == 1 << 20),
                "{e}"
            );
            let before = current_affinity().unwrap();
            if let [a, b, ..] = before[..] {
                pin_current_thread(a).unwrap();
                pin_current_thread(b).unwrap();
                assert_eq!(current_affinity().unwrap(), vec![b]);
            }
        })
        .join()
        .unwrap();
    }
}
