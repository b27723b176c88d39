// SpinPool: the CPU kernels' own worker threads, in place of OpenMP.
//
// The engine steps in a thread of its own, and there libgomp's teams cost: the same 120 SmolLM2 matmuls of
// one decode token took 7.2 ms from the main thread and 15-16 ms from a second thread (torch's own
// F.linear: 15.7 vs 24.7 ms). OMP_WAIT_POLICY, GOMP_SPINCOUNT and releasing the main thread's team did not
// change it; the workers of a non-initial thread's team wake too late for regions of ~50 us. This pool's
// workers spin (yielding the core to any other runnable thread) for a short while after each job, then
// sleep on a condition variable, so back-to-back calls of a step find them awake. One job runs at a time;
// the calling thread takes part 0; `post` hands the workers a job of their own to do until the next one
// comes (reading ahead what it will read). A forked child gets a fresh pool (threads do not survive fork).
// Called from the process's initial thread (a script stepping the engine itself), the job goes to OpenMP
// instead.
#pragma once

#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <cstdlib>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

class SpinPool {
 public:
  static SpinPool& instance() {
    static std::mutex guard;
    static SpinPool* pool = nullptr;
    static uint64_t made_after = 0;                  // forks() when it was made
    std::lock_guard<std::mutex> lock(guard);
    const uint64_t now = forks().load(std::memory_order_relaxed);
    if (pool == nullptr || made_after != now) {      // first use, or a forked child: the old threads are gone
      pool = new SpinPool();                         // never freed: workers live as long as the process
      made_after = now;
    }
    return *pool;
  }

  int capacity() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(t) for t in [0, n) on n threads (n capped at the pool's size); returns when every part is done.
  // On the process's initial thread OpenMP's team does it: there libgomp's workers spin as torch's own do,
  // and a second set of spinning workers would only take the core from them.
  void run(int n, const std::function<void(int)>& fn) {
    n = std::min(n, capacity());
    if (n <= 1) {
      fn(0);
      return;
    }
    if (on_initial_thread()) {
#pragma omp parallel num_threads(n)
      fn(omp_get_thread_num());
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mutex_);
    end_posted();
    publish(&fn, n);
    fn(0);
    while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

  // fn(t) for t in [1, n) started on the workers, and back at once (the caller takes no part): work for the
  // workers' idle time between two `run`s, such as reading ahead the weights the next `run` multiplies. The
  // next `run` or `post` raises `cancelled()` and waits for it, so fn checks `cancelled()` every few
  // microseconds. Nothing is posted from the process's initial thread (its `run`s go to OpenMP's team, beside
  // which a pool worker busy with it would take a core).
  void post(int n, std::function<void(int)> fn) {
    n = std::min(n, capacity());
    if (n <= 1 || on_initial_thread()) return;
    std::lock_guard<std::mutex> one_job(job_mutex_);
    end_posted();
    posted_ = std::move(fn);
    publish(&posted_, n);
  }

  bool cancelled() const { return cancel_.load(std::memory_order_relaxed); }

 private:
  SpinPool() {
    if (const char* env = std::getenv("ADAPTERS_CORE_SPIN_US")) spin_ = std::chrono::microseconds(std::atoll(env));
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                             : static_cast<int>(std::thread::hardware_concurrency());
    for (int i = 1; i < std::max(cpus, 1); ++i) {
      workers_.emplace_back([this, i] { loop(i); });
      workers_.back().detach();
    }
  }

  // Whether the calling thread is the process's initial one (its thread id is the process id), without a
  // system call per job: the process id is read once per process (a forked child reads its own: the thread
  // that forked is its initial thread), each thread's id once per process it runs in.
  static bool on_initial_thread() {
    static const pid_t first_pid = getpid();       // libgomp's team does not survive fork: children use the pool
    thread_local uint64_t seen_forks = ~uint64_t{0};
    thread_local bool initial = false;
    const uint64_t now = forks().load(std::memory_order_relaxed);
    if (seen_forks != now) {
      const pid_t pid = getpid();
      initial = static_cast<pid_t>(syscall(SYS_gettid)) == pid && pid == first_pid;
      seen_forks = now;
    }
    return initial;
  }

  // Forks of this process so far, counted in the child (a child's count differs from its parent's at fork).
  static std::atomic<uint64_t>& forks() {
    static std::atomic<uint64_t> count{0};
    static const bool watching = [] {
      pthread_atfork(nullptr, nullptr, [] { count.fetch_add(1, std::memory_order_relaxed); });
      return true;
    }();
    (void)watching;
    return count;
  }

  // Hands `job` to workers 1..n-1 (job_mutex_ held, no job running).
  void publish(const std::function<void(int)>* job, int n) {
    job_ = job;
    remaining_.store(n - 1, std::memory_order_relaxed);
    {
      // the generation carries its job's worker count, so a worker never pairs one job's count with another
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      const uint64_t next = ((generation_.load(std::memory_order_relaxed) >> 16) + 1) << 16;
      generation_.store(next | static_cast<uint64_t>(n - 1), std::memory_order_release);
    }
    wake_.notify_all();
  }

  // Stops a posted job still running, waits for its workers and lets go of it with what it holds
  // (job_mutex_ held).
  void end_posted() {
    if (remaining_.load(std::memory_order_acquire) != 0) {
      cancel_.store(true, std::memory_order_relaxed);
      while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    }
    cancel_.store(false, std::memory_order_relaxed);
    if (posted_) posted_ = nullptr;
  }

  void loop(int index) {
    using clock = std::chrono::steady_clock;
    uint64_t seen = 0;            // the generation before any job: a job published before this thread ran still runs
    for (;;) {
      uint64_t now_gen;
      auto idle_since = clock::now();
      int spins = 0;
      while ((now_gen = generation_.load(std::memory_order_acquire)) == seen) {
        std::this_thread::yield();                 // spin, but let any other runnable thread have the core
        if (++spins % 64 == 0 && clock::now() - idle_since > spin_) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = now_gen;
      if (index <= static_cast<int>(now_gen & 0xffff)) {
        (*job_)(index);
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::chrono::microseconds spin_{200};
  std::vector<std::thread> workers_;
  std::mutex job_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> cancel_{false};
  const std::function<void(int)>* job_ = nullptr;
  std::function<void(int)> posted_;                // the job `post` started (the caller's copy may be gone)
};

// body(begin, end) over contiguous runs of [0, items) that the threads claim in turn from a shared position,
// each claim ceil(left / (2 parts)) items (OpenMP's `guided` schedule, halved): the first claims are long runs
// and the last ones single items. With one fixed run per thread a region ended when its slowest thread did:
// on a machine whose cores also run the server's event loop and adapter loader, the OS takes a worker off its
// core for a few ms now and then, and the step waited for it; claimed runs let the others take over its share.
// Against 4 equal runs per thread (until 2026-12), the long first runs start fewer cold streams through the
// weights and the short last ones leave less waiting at the end: SmolLM2 decode steps on the Zen 4, the two
// schedules alternating every 10 steps in one process, medians: F32 weights, one sequence 23.61 -> 22.87 ms,
// 16 sequences 47.43 -> 45.81; Q4_1 unchanged (7.30 / 7.35, 8.52 / 8.58; 16 sequences 43.23 / 43.50).
// Per-claim set-up goes at the top of body. Small jobs (`items < min_items`) run inline.

// Threads a spin_parallel over `items` runs on (1: inline).
inline int spin_parts(int64_t items, int64_t min_items = 2) {
  return items < min_items ? 1 : static_cast<int>(std::min<int64_t>(items, SpinPool::instance().capacity()));
}

// spin_parallel's `min_items` for a job over `items` that touches `values` values in all: inline up to 64 Ki
// values (a decode row's norm or SwiGLU, where waking a worker cost more than the work), else on the pool.
inline int64_t spin_min_items(int64_t items, int64_t values) { return values > (1 << 16) ? 2 : items + 1; }

// Items of the claim that starts at `begin` of a spin_parallel over `items` on `parts` threads (0 at the end).
inline int64_t spin_claim_items(int64_t items, int parts, int64_t begin) {
  return (items - begin + 2 * int64_t{parts} - 1) / (2 * int64_t{parts});
}

// Where the `k`-th claim (0-based) of such a job starts when the claims are taken in turn (items: none left).
// The calling thread takes claim 0 as it publishes the job, so worker t most often takes claim t.
inline int64_t spin_claim_begin(int64_t items, int parts, int k) {
  int64_t begin = 0;
  for (int i = 0; i < k && begin < items; ++i) begin += spin_claim_items(items, parts, begin);
  return begin;
}

// One thread's part of a job over `items` on `parts` threads: claims from the shared position `next`, each run
// handed to body, until none is left; each finished run's length is taken from `left` (when given, release
// order).
inline void spin_claims(std::atomic<int64_t>& next, int64_t items, int parts,
                        const std::function<void(int64_t, int64_t)>& body, std::atomic<int64_t>* left = nullptr) {
  for (;;) {
    int64_t begin = next.load(std::memory_order_relaxed), end;
    do {
      if (begin >= items) return;
      end = std::min(items, begin + spin_claim_items(items, parts, begin));
    } while (!next.compare_exchange_weak(begin, end, std::memory_order_relaxed));
    body(begin, end);
    if (left != nullptr) left->fetch_sub(end - begin, std::memory_order_release);
  }
}

inline void spin_parallel(int64_t items, const std::function<void(int64_t, int64_t)>& body,
                          int64_t min_items = 2) {
  SpinPool& pool = SpinPool::instance();
  const int parts = spin_parts(items, min_items);
  if (parts <= 1) {
    if (items > 0) body(0, items);
    return;
  }
  std::atomic<int64_t> next{0};
  pool.run(parts, [&](int) { spin_claims(next, items, parts, body); });
}

// spin_parallel(items, body) with other work beside it on the same threads: `side` over `side_items`, claimed
// from a queue of its own in the same guided runs. The workers take side runs first and the calling thread
// the main ones; a thread whose queue runs dry moves to the other, so neither waits while the other has runs
// left. Made for a decode step's LoRA deltas beside the matmul of the same input (decode_layers.cpp): the
// deltas' reads of the adapters' factors are paced by one core's fetch rate, the matmul by arithmetic, and
// side by side each keeps its pace where one after the other the step paid both. `side_left` (set to
// side_items by the caller) counts down as side runs finish (release order), so main runs can see, with an
// acquire load, when all of the side work is done. Neither body may start a spin_parallel of its own.
inline void spin_parallel_beside(int64_t items, const std::function<void(int64_t, int64_t)>& body, int64_t side_items,
                                 const std::function<void(int64_t, int64_t)>& side, std::atomic<int64_t>& side_left,
                                 int64_t min_items = 2) {
  const int parts = std::max(spin_parts(items, min_items), spin_parts(side_items, 2));
  std::atomic<int64_t> next_main{0}, next_side{0};
  if (parts <= 1) {
    spin_claims(next_side, side_items, 1, side, &side_left);
    spin_claims(next_main, items, 1, body);
    return;
  }
  SpinPool::instance().run(parts, [&](int t) {
    if (t != 0) spin_claims(next_side, side_items, parts, side, &side_left);
    spin_claims(next_main, items, parts, body);
    spin_claims(next_side, side_items, parts, side, &side_left);
  });
}

// Work a matmul's threads do beside it (spin_parallel_beside): `items` runs of `body`, which write an fp32
// delta [M, N] (row stride ldd) that is then added to the matmul's output, out = (x W^T + bias) + delta, the
// same two roundings as the matmul followed by an in-place add of the delta.
struct BesideWork {
  int64_t items = 0;
  const std::function<void(int64_t, int64_t)>* body = nullptr;
  const float* delta = nullptr;
  int64_t ldd = 0;
};
