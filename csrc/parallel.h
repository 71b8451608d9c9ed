// OpenMP helpers: thread ids, running a fixed number of tasks, a team with barriers. Without OpenMP
// everything runs on the calling thread.
#pragma once

#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rloss {

inline bool have_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Runs f(v) for every v in [0, nv) on up to nv threads (each v exactly once, whatever team size the
// runtime grants). Exceptions thrown by f are carried out of the parallel region and rethrown.
template <class F>
void parallel_each(int nv, F&& f) {
  if (nv <= 1) {
    if (nv == 1) f(0);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr err = nullptr;
#pragma omp parallel num_threads(nv)
  {
    const int tid = thread_id(), nth = team_size();
    for (int v = tid; v < nv; v += nth) {
      try {
        f(v);
      } catch (...) {
#pragma omp critical(rloss_lattice_error)
        {
          if (!err) err = std::current_exception();
        }
      }
    }
  }
  if (err) std::rethrow_exception(err);
#else
  for (int v = 0; v < nv; ++v) f(v);
#endif
}

// Runs body(tid, nth, barrier) on a team of nt threads, or inline when nt == 1. barrier() waits for
// the whole team. body must not throw (an exception cannot leave a parallel region).
template <class F>
void run_team(int nt, F&& body) {
  auto no_barrier = []() {};
  if (nt == 1) {
    body(0, 1, no_barrier);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  body(thread_id(), team_size(), []() {
#pragma omp barrier
  });
#else
  body(0, 1, no_barrier);
#endif
}

}  // namespace rloss
