//! Scoped helper threads that fall back to the thread that joins them.
//!
//! Hashing, populating and probing split their work over threads only to go faster. When a
//! thread cannot be started (no address space left for its stack under `RLIMIT_AS`, a
//! thread limit), [`spawn`] keeps the job and [`Job::join`] runs it on the joining thread:
//! the step is slower, and the migration goes on. `std::thread::Scope::spawn` would panic
//! instead, and a destination short of memory died with a backtrace in place of its error.

use std::sync::mpsc::{sync_channel, SendError};
use std::thread::{Builder, Scope, ScopedJoinHandle};

/// A job started on a scoped thread of its own, or kept to run where it is joined.
pub(crate) enum Job<'scope, J, R> {
    Thread(ScopedJoinHandle<'scope, Option<R>>),
    Here(J),
}

/// Starts `job` on a new thread of `s`, or keeps it for [`Job::join`] if none can be started.
pub(crate) fn spawn<'scope, J, R>(s: &'scope Scope<'scope, '_>, job: J) -> Job<'scope, J, R>
where
    J: FnOnce() -> R + Send + 'scope,
    R: Send + 'scope,
{
    spawn_with(Builder::new(), s, job)
}

fn spawn_with<'scope, J, R>(b: Builder, s: &'scope Scope<'scope, '_>, job: J) -> Job<'scope, J, R>
where
    J: FnOnce() -> R + Send + 'scope,
    R: Send + 'scope,
{
    // The job is handed over once the thread runs: a thread that could not start leaves it here
    // (`Builder::spawn_scoped` would drop it with the error).
    let (tx, rx) = sync_channel::<J>(1);
    match b.spawn_scoped(s, move || rx.recv().ok().map(|job| job())) {
        Ok(h) => match tx.send(job) {
            Ok(()) => Job::Thread(h),
            Err(SendError(job)) => Job::Here(job),
        },
        Err(e) => {
            log::warn!("could not start a helper thread ({e}); its work runs on this one");
            Job::Here(job)
        }
    }
}

impl<J: FnOnce() -> R, R> Job<'_, J, R> {
    /// The job's result, from its thread (`Err` with the payload if it panicked) or computed
    /// here now.
    pub(crate) fn join(self) -> std::thread::Result<R> {
        match self {
            Job::Thread(h) => h
                .join()
                .map(|r| r.expect("a thread that started was handed its job")),
            Job::Here(job) => Ok(job()),
        }
    }

    /// Whether the job has a thread of its own.
    #[cfg(test)]
    fn on_thread(&self) -> bool {
        matches!(self, Job::Thread(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_their_threads_or_where_joined() {
        let here = std::thread::current().id();
        let mut out = [None, None];
        std::thread::scope(|s| {
            let started = spawn(s, || std::thread::current().id());
            // A stack larger than the address space: the thread cannot start.
            let huge = Builder::new().stack_size(1 << 50);
            let kept = spawn_with(huge, s, || std::thread::current().id());
            assert!(started.on_thread());
            assert!(!kept.on_thread(), "a 1 PiB stack was mapped");
            out = [Some(started.join().unwrap()), Some(kept.join().unwrap())];
        });
        assert_ne!(out[0], Some(here));
        assert_eq!(out[1], Some(here));
    }

    #[test]
    fn a_panic_on_a_thread_comes_back_at_join() {
        std::thread::scope(|s| {
            let job = spawn(s, || -> u32 { panic!("boom") });
            assert!(job.join().is_err());
        });
    }
}
