// The one wait loop of the extension. Non-blocking NCCL communicators report readiness and
// errors only through ncclCommGetAsyncError, and waits must stay bounded (a blocking
// cudaEventSynchronize cannot time out), so every wait here polls a probe.
//
// Why not just sleep between probes: a 10 us std::this_thread::sleep_for returns after
// ~60-80 us on Linux (the default 50 us timer slack of a normal thread), while a
// non-blocking NCCL call is usually ready within a few microseconds. Sleeping first made
// every issued op cost ~77 us of host time. So the loop spins (with a CPU relax hint) for
// a short budget, then yields the core, and only then sleeps, with growing sleeps under a
// reduced timer slack.
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

namespace pyengine {

using Clock = std::chrono::steady_clock;

inline Clock::time_point deadline_after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

struct PollPolicy {
  const char* name;
  std::chrono::nanoseconds spin;          // probe back to back (CPU relax hint) this long,
  std::chrono::nanoseconds yield;         // then yield the core between probes this long,
  std::chrono::microseconds first_sleep;  // then sleep, doubling each time,
  std::chrono::microseconds max_sleep;    // up to this.
  // Timer slack (ns) for the polling thread while it sleeps; 0 leaves the thread's own
  // (50 us by default, which is what makes short sleeps ~60 us longer than asked).
  std::int64_t timer_slack_ns;
};

// Every wait in the extension (NCCL readiness, group end, events, finalize).
inline constexpr PollPolicy kFastPoll{"fast", std::chrono::microseconds(20),
                                      std::chrono::microseconds(200),
                                      std::chrono::microseconds(20),
                                      std::chrono::microseconds(200), 1000};
// The first policy (sleep 10 us first, doubling to 1 ms: ~77 us of host time per issued op),
// kept only so the benchmark
// (_C._poll_overhead, bench/bench_poll.py) can compare against it.
inline constexpr PollPolicy kLegacyPoll{"legacy", std::chrono::nanoseconds(0),
                                        std::chrono::nanoseconds(0),
                                        std::chrono::microseconds(10),
                                        std::chrono::microseconds(1000), 0};

// kFastPoll or kLegacyPoll by name; pyengine::Error for any other name.
const PollPolicy& poll_policy(const std::string& name);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

// Lowers the calling thread's timer slack for its lifetime (Linux prctl; a no-op when
// slack_ns is 0 or elsewhere) and restores the previous value.
class TimerSlack {
 public:
  explicit TimerSlack(std::int64_t slack_ns);
  ~TimerSlack();
  TimerSlack(const TimerSlack&) = delete;
  TimerSlack& operator=(const TimerSlack&) = delete;

 private:
  long previous_ = -1;
};

// Calls probe() until it returns true (-> true) or `deadline` passes (-> false). The probe
// runs once more than the deadline check, so a condition that became true just in time
// still counts. Exceptions from the probe propagate.
template <typename Probe>
bool poll_until(Probe&& probe, Clock::time_point deadline, const PollPolicy& policy = kFastPoll) {
  const auto start = Clock::now();
  auto sleep = policy.first_sleep;
  for (;;) {
    if (probe()) return true;
    const auto now = Clock::now();
    if (now > deadline) return false;
    const auto waited = now - start;
    if (waited < policy.spin) {
      cpu_relax();
    } else if (waited < policy.spin + policy.yield) {
      std::this_thread::yield();
    } else {
      // Only long waits get here; the prctl pair is cheap next to the sleep itself.
      TimerSlack slack(policy.timer_slack_ns);
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, policy.max_sleep);
    }
  }
}

// _poll_overhead (the wait loop's benchmark).
void register_poll(pybind11::module_& m);

}  // namespace pyengine
