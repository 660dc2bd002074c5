//! CPU time, for the report's CPU-seconds per GiB migrated.

use std::time::Duration;

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; `id` is a CPU-time clock id.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time used by the calling thread.
pub fn thread_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time used by the whole process.
pub fn process_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time used by another thread of this process.
pub fn pthread_time(t: libc::pthread_t) -> Duration {
    let mut id: libc::clockid_t = 0;
    // SAFETY: `t` is a live thread of this process (the caller holds its JoinHandle) and
    // `id` is a valid out pointer.
    if unsafe { libc::pthread_getcpuclockid(t, &mut id) } != 0 {
        return Duration::ZERO;
    }
    clock(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_thread_uses_cpu() {
        let t0 = thread_time();
        let mut x = 0u64;
        while thread_time() - t0 < Duration::from_millis(20) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(process_time() >= thread_time());
        // SAFETY: pthread_self is always valid for the calling thread.
        let me = unsafe { libc::pthread_self() };
        assert!(pthread_time(me) >= Duration::from_millis(20));
    }
}
