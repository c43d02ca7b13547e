// What fluxjax's CPU kernels share: float vectors of the host's width (GCC/Clang vector
// extensions, compiled with -march=native) and a parallel loop on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace fluxjax_simd {

// Floats per vector: one AVX-512 register, else two AVX2 (or four NEON) registers per vector.
#if defined(__AVX512F__)
#define FLUXJAX_LANES 16
#else
#define FLUXJAX_LANES 8
#endif
constexpr int W = FLUXJAX_LANES;

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
// The same vector, allowed at any float-aligned address (unaligned loads and stores).
typedef float vf_unaligned __attribute__((vector_size(W * 4), aligned(4), may_alias));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }
inline vf splat(float s) {
  const vf first = {s};
#if defined(__clang__)
  return __builtin_shufflevector(first, first, 0, 0, 0, 0, 0, 0, 0, 0
#if FLUXJAX_LANES == 16
                                 , 0, 0, 0, 0, 0, 0, 0, 0
#endif
  );
#else
  return __builtin_shuffle(first, vi{});  // every lane takes lane 0: one broadcast
#endif
}

// Runs fn(item, scratch) for item in [0, items). Items are claimed from a shared counter by the
// calling thread and by helpers scheduled on XLA's pool; each thread has its own scratch. The
// caller waits only for items already claimed, never for a helper that has not started, so a
// busy pool cannot deadlock it. The shared state outlives helpers that start late.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto work = std::make_shared<Work>();
  work->total = items;
  auto run = [work, fn] {
    std::vector<float> scratch;
    for (int64_t item; (item = work->next.fetch_add(1)) < work->total;) {
      fn(item, scratch);
      if (work->done.fetch_add(1) + 1 == work->total) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });  // a prvalue: Schedule moves it
  run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->total; });
}

}  // namespace fluxjax_simd
