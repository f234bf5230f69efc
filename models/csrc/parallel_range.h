// at::parallel_for's split for the kernels in this folder, without ATen's headers (they were most of a build's
// time): [begin, end) cut into at most `threads` contiguous ranges of at least `grain` items, one per OpenMP thread.
// The kernels link the OpenMP runtime that torch loaded (same soname), so they share torch's thread pool; like ATen's
// invoke_parallel, the region takes the whole team (no num_threads clause, which makes libgomp shrink its pool and
// torch's next op start threads again) and the threads beyond the split idle. An exception thrown in the region is
// caught there and rethrown after it (one escaping an OpenMP region terminates the process).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

template <typename F>
void parallel_range(int64_t begin, int64_t end, int64_t grain, int64_t threads, const F& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t t = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (t <= 1 || omp_in_parallel()) {
    fn(begin, end);
    return;
  }
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
#pragma omp parallel
  {
    const int64_t nt = std::min<int64_t>(omp_get_num_threads(), t), id = omp_get_thread_num();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t b = begin + id * chunk, e = std::min(end, b + chunk);
    if (id < nt && b < e) {
      try {
        fn(b, e);
      } catch (...) {
        if (!failed.test_and_set()) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// The kernels' C entry points return guarded(body): 0, or 1 if the body threw (an allocation failed), so that no C++
// exception crosses the C interface.
template <typename F>
int guarded(const F& body) {
  try {
    body();
    return 0;
  } catch (...) {
    return 1;
  }
}
