#include "poll.hpp"

#include <pybind11/stl.h>
#include <time.h>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include <optional>
#include <vector>

#include "check.hpp"

namespace py = pybind11;

namespace pyengine {

const PollPolicy& poll_policy(const std::string& name) {
  if (name == kFastPoll.name) return kFastPoll;
  if (name == kLegacyPoll.name) return kLegacyPoll;
  PYENGINE_CHECK(false, "unknown poll policy '" << name << "' (fast or legacy)");
}

TimerSlack::TimerSlack(std::int64_t slack_ns) {
#if defined(__linux__)
  if (slack_ns > 0) {
    const int current = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    if (current >= 0 && current != slack_ns &&
        prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(slack_ns), 0, 0, 0) == 0) {
      previous_ = current;
    }
  }
#else
  (void)slack_ns;
#endif
}

TimerSlack::~TimerSlack() {
#if defined(__linux__)
  if (previous_ >= 0) {
    (void)prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(previous_), 0, 0, 0);
  }
#endif
}

namespace {

double thread_cpu_us() {
  timespec ts{};
  PYENGINE_CHECK(clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0, "clock_gettime failed");
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) * 1e-3;
}

double percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const auto index = static_cast<std::size_t>(q * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

double mean(const std::vector<double>& values) {
  double sum = 0.0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

std::chrono::nanoseconds us_to_ns(double us) {
  return std::chrono::nanoseconds(static_cast<std::int64_t>(us * 1e3));
}

// How late poll_until notices a condition that becomes true `ready_after_us` after the wait
// starts, and how much CPU the wait burns: the host cost of waiting for a non-blocking NCCL
// call (or an event) without a GPU. The probe is a clock comparison, so it costs ~20 ns
// like ncclCommGetAsyncError / cudaEventQuery do not; late_us is the policy's own overhead.
py::dict poll_overhead(double ready_after_us, int iters, const std::string& policy_name,
                       std::optional<double> spin_us, std::optional<double> yield_us,
                       std::optional<double> first_sleep_us, std::optional<double> max_sleep_us,
                       std::optional<std::int64_t> timer_slack_ns) {
  PYENGINE_CHECK(iters >= 1, "_poll_overhead: iters must be >= 1, got " << iters);
  PYENGINE_CHECK(ready_after_us >= 0.0, "_poll_overhead: ready_after_us must be >= 0");
  PollPolicy policy = poll_policy(policy_name);
  if (spin_us) policy.spin = us_to_ns(*spin_us);
  if (yield_us) policy.yield = us_to_ns(*yield_us);
  if (first_sleep_us) {
    policy.first_sleep = std::chrono::microseconds(static_cast<std::int64_t>(*first_sleep_us));
  }
  if (max_sleep_us) {
    policy.max_sleep = std::chrono::microseconds(static_cast<std::int64_t>(*max_sleep_us));
  }
  if (timer_slack_ns) policy.timer_slack_ns = *timer_slack_ns;

  std::vector<double> late(iters), wall(iters), cpu(iters), probes(iters);
  {
    py::gil_scoped_release nogil;
    const auto ready_after = us_to_ns(ready_after_us);
    for (int i = 0; i < iters; ++i) {
      long count = 0;
      const double cpu0 = thread_cpu_us();
      const auto start = Clock::now();
      const auto ready_at = start + ready_after;
      const bool ok = poll_until(
          [&] {
            ++count;
            return Clock::now() >= ready_at;
          },
          start + std::chrono::seconds(10), policy);
      const auto end = Clock::now();
      PYENGINE_CHECK(ok, "_poll_overhead: the probe never became true");
      cpu[i] = thread_cpu_us() - cpu0;
      wall[i] = std::chrono::duration<double, std::micro>(end - start).count();
      late[i] = std::chrono::duration<double, std::micro>(end - ready_at).count();
      probes[i] = static_cast<double>(count);
    }
  }
  py::dict out;
  out["policy"] = policy_name;
  out["ready_after_us"] = ready_after_us;
  out["iters"] = iters;
  out["late_us_mean"] = mean(late);
  out["late_us_p50"] = percentile(late, 0.5);
  out["late_us_p99"] = percentile(late, 0.99);
  out["late_us_max"] = percentile(late, 1.0);
  out["wall_us_mean"] = mean(wall);
  out["cpu_us_mean"] = mean(cpu);
  out["probes_mean"] = mean(probes);
  return out;
}

}  // namespace

void register_poll(py::module_& m) {
  m.def("_poll_overhead", &poll_overhead, py::arg("ready_after_us"), py::arg("iters"),
        py::arg("policy") = "fast", py::arg("spin_us") = py::none(),
        py::arg("yield_us") = py::none(), py::arg("first_sleep_us") = py::none(),
        py::arg("max_sleep_us") = py::none(), py::arg("timer_slack_ns") = py::none(),
        "Benchmark of the wait loop (no GPU needed): runs `iters` waits for a condition that "
        "becomes true ready_after_us after each wait starts, under the named policy ('fast': "
        "the one every wait uses; 'legacy': the sleep-first loop it replaced), optionally "
        "overriding its parameters. Returns late_us_{mean,p50,p99,max} (how long after the "
        "condition the loop returned), wall_us_mean, cpu_us_mean (thread CPU time per wait) "
        "and probes_mean.");
}

}  // namespace pyengine
