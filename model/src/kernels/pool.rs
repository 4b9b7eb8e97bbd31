//! A persistent worker pool for kernel calls.
//!
//! Decode runs hundreds of small matrix products per token; spawning or waking tasks per call
//! costs more than the work. Workers spin briefly on an epoch counter between calls and then
//! park on a condition variable, so a busy neighbour process slows us down gracefully instead of
//! starving spinning threads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

type Job = *const (dyn Fn(usize) + Sync);

struct JobSlot(Option<Job>);
// SAFETY: the pointer is only dereferenced while `run` keeps the closure alive (see `run`).
unsafe impl Send for JobSlot {}

struct Shared {
    epoch: AtomicU64,
    pending: AtomicUsize,
    shutdown: AtomicBool,
    job: Mutex<JobSlot>,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

/// A fixed set of worker threads; `run(f)` calls `f(t)` once for each thread index `t`.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    // Serialises callers: one `run` at a time owns the workers.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool where the caller plus `threads - 1` workers share each call.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(JobSlot(None)),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|idx| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("halfstep-kernel-{idx}"))
                    .spawn(move || worker_loop(shared, idx))
                    .expect("spawning a kernel worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            threads,
            run_lock: Mutex::new(()),
        }
    }

    /// Number of threads a call is split over (caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(t)` for every `t` in `0..threads()` in parallel and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erase the lifetime; workers only use the pointer before `pending` reaches 0,
        // and we do not return (or unwind) before that.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        self.shared.job.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(job);
        self.shared
            .pending
            .store(self.threads - 1, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        {
            let sleepers = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *sleepers > 0 {
                self.shared.wake.notify_all();
            }
        }
        let caller = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.shared.job.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
        if let Err(p) = caller {
            std::panic::resume_unwind(p);
        }
    }
}

/// A barrier for the threads of one [`ThreadPool::run`] call, which all run at once: phases
/// of a job that read what every thread wrote in the phase before.
pub(crate) struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

impl SpinBarrier {
    /// A barrier for `threads` threads.
    pub(crate) fn new(threads: usize) -> SpinBarrier {
        SpinBarrier {
            threads: threads.max(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Returns once every thread has called `wait` as often as this one; panics if a thread
    /// panicked while holding a [`SpinBarrier::guard`] (it would never arrive).
    pub(crate) fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            assert!(
                !self.poisoned.load(Ordering::Relaxed),
                "a thread of this kernel call panicked"
            );
            spins = spins.saturating_add(1);
            // A thread descheduled by the host must get its core back.
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Held by each thread for the duration of its part: if the thread panics, the others
    /// stop waiting for it.
    pub(crate) fn guard(&self) -> impl Drop + '_ {
        struct Guard<'a>(&'a SpinBarrier);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.poisoned.store(true, Ordering::Relaxed);
                }
            }
        }
        Guard(self)
    }
}

fn worker_loop(shared: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut epoch = shared.epoch.load(Ordering::Acquire);
        while epoch == seen {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a spin: look at it every 256 spins.
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                let mut sleepers = shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while shared.epoch.load(Ordering::Acquire) == seen
                    && !shared.shutdown.load(Ordering::Acquire)
                {
                    sleepers = shared
                        .wake
                        .wait(sleepers)
                        .unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
            }
            epoch = shared.epoch.load(Ordering::Acquire);
        }
        seen = epoch;
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let job = shared.job.lock().unwrap_or_else(|e| e.into_inner()).0;
        if let Some(job) = job {
            // SAFETY: `run` keeps the closure alive until `pending` reaches zero.
            let f = unsafe { &*job };
            // A panicking kernel must not leave the caller waiting forever.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(idx)));
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _s = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_calls_every_thread_index_once() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn barrier_phases_see_every_thread_write() {
        let pool = ThreadPool::new(3);
        for _ in 0..200 {
            let barrier = SpinBarrier::new(3);
            let slots: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            let seen: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|t| {
                let _g = barrier.guard();
                for phase in 1..=4 {
                    slots[t].store(phase, Ordering::Relaxed);
                    barrier.wait();
                    // Every thread has written this phase, and none the next one yet.
                    let all = slots.iter().all(|s| s.load(Ordering::Relaxed) == phase);
                    seen[t].fetch_add(all as usize, Ordering::Relaxed);
                    barrier.wait();
                }
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 4));
        }
    }

    #[test]
    fn a_panicking_thread_releases_the_barrier() {
        let pool = ThreadPool::new(2);
        let barrier = SpinBarrier::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|t| {
                let _g = barrier.guard();
                if t == 1 {
                    panic!("kernel bug");
                }
                barrier.wait();
            })
        }));
        assert!(
            r.is_err(),
            "the caller's wait must end in a panic, not hang"
        );
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(Duration::from_millis(5));
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
