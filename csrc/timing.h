// Optional per-phase timing counters of the lattice (nanoseconds, summed over calls; thread-time
// when images run in parallel). Off unless switched on; the benchmark reads them.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace rloss {

enum TimerId { kTEmbed = 0, kTMerge, kTIndex, kTSplat, kTBlur, kTSlice, kNumTimers };

struct Timers {
  std::atomic<bool> enabled{false};
  std::atomic<int64_t> ns[kNumTimers];
  Timers() { reset(); }
  void reset() {
    for (auto& v : ns) v.store(0);
  }
};
Timers& timers();
const char* timer_name(int id);

using Clock = std::chrono::steady_clock;

// Adds the time since t0 to counter id (when timing is on).
void add_time(TimerId id, Clock::time_point t0);

// Accumulates the elapsed time of consecutive phases of thread 0 of a team.
struct PhaseClock {
  bool on;
  Clock::time_point ts = Clock::now();
  explicit PhaseClock(int tid) : on(tid == 0 && timers().enabled.load(std::memory_order_relaxed)) {}
  void lap(TimerId id) {
    if (!on) return;
    add_time(id, ts);
    ts = Clock::now();
  }
};

}  // namespace rloss
