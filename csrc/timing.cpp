#include "timing.h"

namespace rloss {

Timers& timers() {
  static Timers t;
  return t;
}

const char* timer_name(int id) {
  static const char* names[kNumTimers] = {"embed+hash", "merge", "slots+neighbours", "splat", "blur", "slice"};
  return (id >= 0 && id < kNumTimers) ? names[id] : "?";
}

void add_time(TimerId id, Clock::time_point t0) {
  Timers& t = timers();
  if (!t.enabled.load(std::memory_order_relaxed)) return;
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  t.ns[id].fetch_add(ns, std::memory_order_relaxed);
}

}  // namespace rloss
