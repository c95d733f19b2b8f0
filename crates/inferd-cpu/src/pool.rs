//! A pool of compute threads that stays up for the life of the process.
//!
//! One caller at a time hands the pool a job (`Fn(part)`), runs part 0 itself
//! and waits for the others; each worker runs its part on its own thread.
//! Between jobs a worker spins for a short while (the next matmul of a step
//! follows within microseconds) and then parks, so an idle server leaves its
//! cores to the HTTP side. A second caller that finds the pool busy runs its
//! parts itself rather than wait. On Linux each worker can be pinned to one
//! of the CPUs the process may use (worker `w` to the `w + 1`-th, leaving the
//! first to the caller), so the kernels' working sets stay in one core's
//! caches.
//!
//! Jobs that share their work through a counter of their own (the matmuls,
//! the quantizer, attention) go through [`Pool::run_shared`]: workers join
//! such a job only while the caller is still working on it, and the caller
//! waits only for workers that joined. A worker whose CPU was taken away
//! (a preempted vCPU, an HTTP thread on its core, a slow wake-up) then
//! costs the caller nothing but the chunk it holds, where a job split in
//! fixed parts would wait for the late worker's whole part.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// A job with its borrow's lifetime erased; valid only while `run` waits.
type Job = *const (dyn Fn(usize) + Sync);

/// Bits of the job word that hold the job's part count.
const PART_BITS: u32 = 16;
/// The job word's flag for a [`Pool::run_shared`] job.
const SHARED: u64 = 1 << PART_BITS;
/// Where the job word's sequence number starts.
const SEQ_SHIFT: u32 = PART_BITS + 1;
/// Where the gate word's sequence number starts: below it, the closed flag
/// and the count of workers that joined.
const GATE_SEQ_SHIFT: u32 = 24;
/// The gate word's flag for a job that takes no more workers.
const CLOSED: u64 = 1 << (GATE_SEQ_SHIFT - 1);
/// The gate word's count of workers that joined.
const JOINED: u64 = CLOSED - 1;

/// A job's sequence number as the gate word holds it.
fn gate_seq(seq: u64) -> u64 {
    (seq << GATE_SEQ_SHIFT) >> GATE_SEQ_SHIFT
}

struct Shared {
    /// The job word: a sequence number bumped once per job (and once at
    /// shutdown) above the [`SHARED`] flag and [`PART_BITS`] bits of the
    /// job's part count. One word, so a worker that wakes late never pairs
    /// one job's number with another's kind or part count.
    generation: AtomicU64,
    /// For a shared job: its sequence number (low bits), whether it is
    /// closed, and how many workers joined it. Workers join with one
    /// compare-and-swap that fails once the caller has closed the job.
    gate: AtomicU64,
    /// Workers that joined the current shared job and have finished it.
    finished: AtomicUsize,
    /// The current job, written before `generation` is bumped.
    job: UnsafeCell<Option<Job>>,
    /// Worker parts not yet finished.
    pending: AtomicUsize,
    /// Set when a worker's part panicked.
    panicked: AtomicBool,
    /// Per worker: parked, or about to park, waiting for a job.
    sleeping: Vec<AtomicBool>,
    shutdown: AtomicBool,
    spin: Duration,
    /// Tests hold the workers here, between seeing a job and joining it.
    #[cfg(test)]
    hold: AtomicBool,
}

// SAFETY: `job` is written only by the one caller holding `Pool::busy`, before
// the release that publishes the job, and read by workers after the acquire
// that sees it; the closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced while the caller
// that owns the closure waits in `run`.
unsafe impl Send for Shared {}

/// The compute threads. See the module docs.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads()).field("spin", &self.shared.spin).finish()
    }
}

impl Pool {
    /// A pool of `threads` compute threads in all, the caller's included
    /// (so `threads - 1` workers), whose idle workers spin for `spin` before
    /// parking.
    pub fn new(threads: usize, spin: Duration) -> Pool {
        Pool::with_pinning(threads, spin, false)
    }

    /// As [`new`](Self::new), with each worker pinned to a CPU when `pin`
    /// is set (Linux only; elsewhere, or when the CPUs cannot be read, the
    /// workers float).
    pub fn with_pinning(threads: usize, spin: Duration, pin: bool) -> Pool {
        let workers = threads.clamp(1, (1 << PART_BITS) - 1) - 1;
        let cpus = if pin { allowed_cpus() } else { Vec::new() };
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            gate: AtomicU64::new(CLOSED),
            finished: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
            spin,
            #[cfg(test)]
            hold: AtomicBool::new(false),
        });
        let handles: Vec<JoinHandle<()>> = (0..workers)
            .map(|w| {
                let shared = shared.clone();
                let cpu = (!cpus.is_empty()).then(|| cpus[(w + 1) % cpus.len()]);
                thread::Builder::new()
                    .name(format!("inferd-cpu-{}", w + 1))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        worker(&shared, w, 0)
                    })
                    .expect("spawn a compute thread")
            })
            .collect();
        let threads = handles.iter().map(|h| h.thread().clone()).collect();
        Pool { shared, threads, handles, busy: Mutex::new(()) }
    }

    /// The process's pool: `INFERD_CPU_THREADS` threads (default: the CPUs
    /// this process may run on), idle workers spinning `INFERD_CPU_SPIN_US`
    /// microseconds (default 100) before they park, pinned to CPUs unless
    /// `INFERD_CPU_PIN=0`.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
            let threads = env("INFERD_CPU_THREADS")
                .map(|n| n as usize)
                .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
            let spin = Duration::from_micros(env("INFERD_CPU_SPIN_US").unwrap_or(100));
            Pool::with_pinning(threads, spin, env("INFERD_CPU_PIN") != Some(0))
        })
    }

    /// Threads a job can be split over, the caller's included.
    pub fn threads(&self) -> usize {
        self.threads.len() + 1
    }

    /// Runs `f(0)`, …, `f(parts - 1)`, each part on its own thread, and
    /// returns when all have finished. `parts` is capped at
    /// [`threads`](Self::threads). A panic in any part is raised here after
    /// every part has stopped.
    pub fn run<F: Fn(usize) + Sync>(&self, parts: usize, f: F) {
        let parts = parts.clamp(1, self.threads());
        if parts == 1 {
            return f(0);
        }
        let _guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Another caller has the workers: do the whole job here.
                return (0..parts).for_each(&f);
            }
        };
        let s = &*self.shared;
        // SAFETY: `pending` reaches zero, which this function waits for
        // before `f` goes out of scope (a panic in part 0 included), only
        // once every worker part has finished with the job.
        let seq = unsafe { self.publish(&f) };
        s.pending.store(parts - 1, Ordering::Relaxed);
        s.generation.store((seq << SEQ_SHIFT) | parts as u64, Ordering::SeqCst);
        self.wake(parts - 1);
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        self.wait_until(|| s.pending.load(Ordering::Acquire) == 0);
        self.finish(mine);
    }

    /// Runs `f` on this thread and on up to `helpers` workers that start
    /// it before this thread's own call of `f` returns. `f` must share its
    /// work out through counters of its own and return when none is left:
    /// a worker that comes late skips the job, and this function returns
    /// once its own call and those of the workers that joined have
    /// returned, never waiting for a worker that did not start. A panic in
    /// any call is raised here after every call has returned.
    pub fn run_shared<F: Fn() + Sync>(&self, helpers: usize, f: F) {
        let helpers = helpers.min(self.threads.len());
        if helpers == 0 {
            return f();
        }
        let _guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return f(),
        };
        let s = &*self.shared;
        let job = |_: usize| f();
        // SAFETY: workers use the job only after joining it, and this
        // function waits for every worker that joined before `job` goes out
        // of scope (a panic in its own call included).
        let seq = unsafe { self.publish(&job) };
        s.finished.store(0, Ordering::Relaxed);
        s.gate.store(gate_seq(seq) << GATE_SEQ_SHIFT, Ordering::SeqCst);
        s.generation.store((seq << SEQ_SHIFT) | SHARED | (helpers + 1) as u64, Ordering::SeqCst);
        self.wake(helpers);
        let mine = catch_unwind(AssertUnwindSafe(&f));
        let joined = (s.gate.fetch_or(CLOSED, Ordering::AcqRel) & JOINED) as usize;
        self.wait_until(|| s.finished.load(Ordering::Acquire) >= joined);
        self.finish(mine);
    }

    /// Makes `job` the current job, clears the panic flag and returns the
    /// job's sequence number, for the caller to publish in the job word.
    ///
    /// # Safety
    /// The caller holds `busy` and keeps `job` alive until no worker can
    /// use it any more, then calls [`finish`](Self::finish).
    unsafe fn publish(&self, job: &(dyn Fn(usize) + Sync + '_)) -> u64 {
        let s = &*self.shared;
        // SAFETY: only the lifetime changes; the caller's guarantee covers
        // every use of the pointer.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), Job>(job) };
        // SAFETY: the caller holds `busy`, and no worker reads `job` until
        // the caller's generation bump publishes it.
        unsafe { *s.job.get() = Some(job) };
        s.panicked.store(false, Ordering::Relaxed);
        (s.generation.load(Ordering::Relaxed) >> SEQ_SHIFT) + 1
    }

    /// Unparks those of the first `n` workers that sleep.
    fn wake(&self, n: usize) {
        for w in 0..n {
            if self.shared.sleeping[w].swap(false, Ordering::SeqCst) {
                self.threads[w].unpark();
            }
        }
    }

    /// Spins, and after a while yields, until `done`.
    fn wait_until(&self, done: impl Fn() -> bool) {
        let start = Instant::now();
        let mut spins = 0u32;
        while !done() {
            spins += 1;
            if spins < 1 << 12 || start.elapsed() < self.shared.spin {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }

    /// Ends a job once no worker uses it: drops the published closure and
    /// raises the caller's panic, or a worker's.
    fn finish(&self, mine: std::thread::Result<()>) {
        let s = &*self.shared;
        // SAFETY: every worker that used the job is done with it.
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if s.panicked.load(Ordering::Acquire) {
            panic!("a compute thread's part of the job panicked");
        }
    }
}

impl Pool {
    /// Calls `f(i, chunk)` for each `chunk_len`-sized chunk `i` of `data`
    /// (the last may be shorter), the chunks spread over the threads and
    /// handed out `grain` at a time from a shared counter, so a thread that
    /// a noisy neighbour slows down takes fewer of them.
    pub fn for_each_chunk<T, F>(&self, data: &mut [T], chunk_len: usize, grain: usize, f: F)
    where
        T: Send,
        F: Fn(usize, &mut [T]) + Sync,
    {
        let chunk_len = chunk_len.max(1);
        let grain = grain.max(1);
        let (len, chunks) = (data.len(), data.len().div_ceil(chunk_len));
        let base = SendPtr(data.as_mut_ptr());
        let next = AtomicUsize::new(0);
        self.run_shared(chunks.div_ceil(grain).saturating_sub(1), || {
            let base = &base;
            loop {
                let first = next.fetch_add(grain, Ordering::Relaxed);
                if first >= chunks {
                    break;
                }
                for i in first..(first + grain).min(chunks) {
                    let start = i * chunk_len;
                    let n = chunk_len.min(len - start);
                    // SAFETY: chunk `i` is handed out once (the counter only
                    // grows), chunks do not overlap, and `data` is borrowed
                    // mutably for the whole of `run_shared`.
                    let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
                    f(i, chunk);
                }
            }
        });
    }
}

/// The CPUs this thread may run on, in order.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the call writes
    // at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Pins the calling thread to `cpu`; a failure leaves it floating.
#[cfg(target_os = "linux")]
fn pin_to(cpu: usize) {
    // SAFETY: as in `allowed_cpus`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_cpu: usize) {}

/// A pointer into a buffer whose disjoint parts the parts of one job write
/// (`for_each_chunk` here; the matmul's columns and the quantizer's rows).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: every user hands each part of its job a disjoint region, and the
// buffer outlives the job.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1 << SEQ_SHIFT, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Worker `w` runs part `w + 1` of each job that has one; `seen` is the job
/// word at the pool's creation.
fn worker(s: &Shared, w: usize, mut seen: u64) {
    let part = w + 1;
    loop {
        // Wait for the next job: spin a while, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let now = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || start.elapsed() < s.spin {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping[w].store(true, Ordering::SeqCst);
            if s.generation.load(Ordering::SeqCst) == seen {
                thread::park();
            }
            s.sleeping[w].store(false, Ordering::SeqCst);
        };
        seen = now;
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        if part as u64 >= now & ((1 << PART_BITS) - 1) {
            continue;
        }
        #[cfg(test)]
        while s.hold.load(Ordering::Acquire) {
            thread::yield_now();
        }
        let shared = now & SHARED != 0;
        if shared && !join(s, now >> SEQ_SHIFT) {
            continue;
        }
        // SAFETY: the caller published the job before bumping the
        // generation and keeps it alive until `pending` reaches zero (for a
        // shared job, which this worker joined: until every worker that
        // joined has finished).
        let job = unsafe { (*s.job.get()).expect("a published job") };
        // SAFETY: as above.
        let f = unsafe { &*job };
        if catch_unwind(AssertUnwindSafe(|| f(part))).is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        if shared {
            s.finished.fetch_add(1, Ordering::Release);
        } else {
            s.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Joins shared job `seq` unless its caller has closed it (or moved on).
fn join(s: &Shared, seq: u64) -> bool {
    let mut g = s.gate.load(Ordering::Acquire);
    loop {
        if g & CLOSED != 0 || g >> GATE_SEQ_SHIFT != gate_seq(seq) {
            return false;
        }
        match s.gate.compare_exchange_weak(g, g + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => g = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_part_runs_once_on_its_own_thread() {
        let pool = Pool::new(4, Duration::from_micros(50));
        for round in 0..200 {
            let hits: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(0)).collect();
            let names = Mutex::new(Vec::new());
            let parts = 1 + round % 4;
            pool.run(parts, |p| {
                hits[p].fetch_add(1, Ordering::Relaxed);
                names.lock().unwrap().push(thread::current().id());
            });
            let hits: Vec<u32> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            let want: Vec<u32> = (0..4).map(|p| u32::from(p < parts)).collect();
            assert_eq!(hits, want, "round {round}");
            let mut ids = names.into_inner().unwrap();
            ids.sort_by_key(|id| format!("{id:?}"));
            ids.dedup();
            assert_eq!(ids.len(), parts, "each part on a different thread");
        }
    }

    #[test]
    fn every_chunk_is_visited_once_with_its_own_elements() {
        let pool = Pool::new(3, Duration::from_micros(20));
        for (len, chunk, grain) in [(0, 4, 1), (1, 4, 1), (10, 3, 1), (100, 7, 2), (1000, 1, 64)] {
            let mut data: Vec<usize> = vec![0; len];
            pool.for_each_chunk(&mut data, chunk, grain, |i, c| {
                assert!(c.len() == chunk || (i + 1) * chunk >= len, "only the last chunk is short");
                for (j, v) in c.iter_mut().enumerate() {
                    *v += i * chunk + j + 1;
                }
            });
            assert_eq!(data, (1..=len).collect::<Vec<_>>(), "len {len} chunk {chunk}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn pinned_workers_run_on_the_allowed_cpus() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let pool = Pool::with_pinning(cpus.len().max(2), Duration::from_micros(20), true);
        let seen = Mutex::new(Vec::new());
        pool.run(pool.threads(), |p| {
            if p > 0 {
                // SAFETY: plain libc call with no arguments.
                seen.lock().unwrap().push((p, unsafe { libc::sched_getcpu() }));
            }
        });
        for (p, cpu) in seen.into_inner().unwrap() {
            assert_eq!(cpu as usize, cpus[p % cpus.len()], "worker of part {p}");
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(3, Duration::ZERO);
        for _ in 0..20 {
            // Long enough for every worker to park between jobs.
            thread::sleep(Duration::from_millis(2));
            let sum = AtomicUsize::new(0);
            pool.run(3, |p| {
                sum.fetch_add(p + 1, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 6);
        }
    }

    #[test]
    fn a_busy_pool_lets_a_second_caller_run_its_job_alone() {
        let pool = Arc::new(Pool::new(2, Duration::from_micros(10)));
        let total = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                thread::spawn(move || {
                    for _ in 0..500 {
                        pool.run(2, |p| {
                            total.fetch_add(p + 1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 500 * 3);
    }

    /// Takes units `0..n` from `next` one at a time, noting which thread
    /// took each, and sleeps `pause` after each.
    fn take_units(next: &AtomicUsize, n: usize, by: &Mutex<Vec<(usize, thread::ThreadId)>>, pause: Duration) {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            by.lock().unwrap().push((i, thread::current().id()));
            thread::sleep(pause);
        }
    }

    #[test]
    fn a_shared_job_does_not_wait_for_a_worker_that_has_not_started_it() {
        let pool = Pool::new(2, Duration::from_micros(50));
        let me = thread::current().id();
        // The worker sees the job but cannot join it: the caller does every
        // unit and returns without it.
        pool.shared.hold.store(true, Ordering::Release);
        let (next, by) = (AtomicUsize::new(0), Mutex::new(Vec::new()));
        thread::scope(|scope| {
            // Should the caller wait for the worker, this lets it go after a
            // while, and the check below fails.
            scope.spawn(|| {
                thread::sleep(Duration::from_secs(2));
                pool.shared.hold.store(false, Ordering::Release);
            });
            pool.run_shared(1, || take_units(&next, 20, &by, Duration::ZERO));
            assert!(pool.shared.hold.load(Ordering::Acquire), "returned while the worker was held");
        });
        let by = by.into_inner().unwrap();
        assert_eq!(by.iter().map(|u| u.0).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
        assert!(by.iter().all(|u| u.1 == me), "only the caller worked");
        // Let go, the worker finds that job closed and skips it; the next
        // job, long enough for it to join, it shares.
        let (next, by) = (AtomicUsize::new(0), Mutex::new(Vec::new()));
        pool.run_shared(1, || take_units(&next, 40, &by, Duration::from_millis(1)));
        let mut by = by.into_inner().unwrap();
        assert!(by.iter().any(|u| u.1 != me), "the worker joined");
        by.sort_by_key(|u| u.0);
        assert_eq!(by.iter().map(|u| u.0).collect::<Vec<_>>(), (0..40).collect::<Vec<_>>(), "each unit once");
        // Fixed-part jobs still run every part, each on its own thread.
        let hits = AtomicUsize::new(0);
        pool.run(2, |p| {
            hits.fetch_add(p + 1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn shared_and_fixed_jobs_interleave_without_losing_or_repeating_work() {
        let pool = Pool::new(3, Duration::from_micros(5));
        for round in 0..300 {
            let n = 1 + round % 37;
            let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let units: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            pool.run_shared(round % 3, || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    units[i].fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
            assert!(units.iter().all(|u| u.load(Ordering::Relaxed) == 1), "round {round}");
            assert!((1..=3).contains(&done.load(Ordering::Relaxed)), "round {round}");
            let hits = AtomicUsize::new(0);
            pool.run(3, |p| {
                hits.fetch_add(1 << p, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 0b111, "round {round}");
        }
    }

    #[test]
    fn a_panic_in_a_shared_job_is_reported_and_the_pool_still_works() {
        let pool = Pool::new(2, Duration::from_millis(5));
        let me = thread::current().id();
        let mut reported = 0;
        for _ in 0..20 {
            // Only a worker panics; the caller waits long enough for it to join.
            let joined = AtomicBool::new(false);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run_shared(1, || {
                    if thread::current().id() != me {
                        joined.store(true, Ordering::Release);
                        panic!("a worker fails");
                    }
                    let start = Instant::now();
                    while !joined.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(5) {
                        thread::yield_now();
                    }
                })
            }));
            assert_eq!(r.is_err(), joined.load(Ordering::Acquire), "a worker's panic reaches the caller");
            reported += usize::from(r.is_err());
        }
        assert!(reported > 0, "the worker joined at least once");
        let n = AtomicUsize::new(0);
        pool.run(2, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_panicking_part_is_reported_to_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2, Duration::from_micros(10));
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(2, |p| assert!(p != 1, "part one fails"))));
        assert!(r.is_err());
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(2, |p| assert!(p != 0, "part zero fails"))));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(2, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
