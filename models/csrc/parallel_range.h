// at::parallel_for's split for the kernels in this folder, without ATen's headers (they are most of a build's time):
// [begin, end) cut into at most `threads` contiguous ranges of at least `grain` items each, one per OpenMP thread.
// The kernels link the OpenMP runtime that torch loaded (same soname), so they share torch's thread pool.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

template <typename F>
void parallel_range(int64_t begin, int64_t end, int64_t grain, int64_t threads, const F& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t t = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (t <= 1 || omp_in_parallel()) {
    fn(begin, end);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(t))
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t b = begin + id * chunk, e = std::min(end, b + chunk);
    if (b < e) fn(b, e);
  }
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
