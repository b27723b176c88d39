// SpinPool: the CPU kernels' own worker threads, in place of OpenMP.
//
// The engine steps in a thread of its own, and there libgomp's teams cost: the same 120 SmolLM2 matmuls of
// one decode token took 7.2 ms from the main thread and 15-16 ms from a second thread (torch's own
// F.linear: 15.7 vs 24.7 ms). OMP_WAIT_POLICY, GOMP_SPINCOUNT and releasing the main thread's team did not
// change it; the workers of a non-initial thread's team wake too late for regions of ~50 us. This pool's
// workers spin (yielding the core to any other runnable thread) for a short while after each job, then
// sleep on a condition variable, so back-to-back calls of a step find them awake. One job runs at a time;
// the calling thread takes part 0. A forked child gets a fresh pool (threads do not survive fork). Called
// from the process's initial thread (a script stepping the engine itself), the job goes to OpenMP instead.
#pragma once

#include <omp.h>
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
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != getpid()) {     // first use, or a forked child: the old threads are gone
      pool = new SpinPool();                         // never freed: workers live as long as the process
      owner = getpid();
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
    static const pid_t first_pid = getpid();      // libgomp's team does not survive fork: children use the pool
    if (static_cast<pid_t>(syscall(SYS_gettid)) == getpid() && getpid() == first_pid) {
#pragma omp parallel num_threads(n)
      fn(omp_get_thread_num());
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mutex_);
    job_ = &fn;
    remaining_.store(n - 1, std::memory_order_relaxed);
    {
      // the generation carries its job's worker count, so a worker never pairs one job's count with another
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      const uint64_t next = ((generation_.load(std::memory_order_relaxed) >> 16) + 1) << 16;
      generation_.store(next | static_cast<uint64_t>(n - 1), std::memory_order_release);
    }
    wake_.notify_all();
    fn(0);
    while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

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
  const std::function<void(int)>* job_ = nullptr;
};

// body(begin, end) over contiguous chunks of [0, items) that the threads claim in turn from a shared counter,
// kChunksPerThread per thread (OpenMP's `parallel` with a `dynamic` schedule: per-chunk set-up goes at the top
// of body). With one fixed chunk per thread a region ended when its slowest thread did: on a machine whose
// cores also run the server's event loop and adapter loader, the OS takes a worker off its core for a few ms
// now and then, and the step waited for it; with claimed chunks the others take over its share. Small jobs
// (`items < min_items`) run inline.
constexpr int64_t kChunksPerThread = 4;

inline void spin_parallel(int64_t items, const std::function<void(int64_t, int64_t)>& body,
                          int64_t min_items = 2) {
  SpinPool& pool = SpinPool::instance();
  const int parts = items < min_items ? 1 : static_cast<int>(std::min<int64_t>(items, pool.capacity()));
  if (parts <= 1) {
    if (items > 0) body(0, items);
    return;
  }
  const int64_t chunks = std::min<int64_t>(items, parts * kChunksPerThread);
  const int64_t per = (items + chunks - 1) / chunks;
  std::atomic<int64_t> next{0};
  pool.run(parts, [&](int) {
    for (int64_t begin; (begin = next.fetch_add(1, std::memory_order_relaxed) * per) < items;)
      body(begin, std::min(items, begin + per));
  });
}
