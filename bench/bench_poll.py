"""Host cost of the wait loop behind every NCCL / CUDA wait in pyengine._C (CPU; no GPU needed).

    python bench/bench_poll.py [--ready-us 0 1 5 20 100 1000] [--iters 2000] [--json]

Every non-blocking NCCL call returns ncclInProgress and is polled until the communicator is
ready; group ends, finalize and Handle.synchronize poll the same way. This measures the loop
itself (csrc/poll.hpp) with a probe that becomes true `ready_after` microseconds after each
wait starts (_C._poll_overhead), for the old sleep-first policy ("legacy": sleep 10 us,
doubling to 1 ms) and the one in use ("fast": spin 20 us, yield to 220 us, then sleeps of
20-200 us under 1 us timer slack):
  late  = how long after the condition became true the loop returned (the host time the
          policy adds to each wait; the target is <= 10 us per issued op)
  cpu   = thread CPU time per wait (what spinning/yielding costs the core)
A real probe (ncclCommGetAsyncError, cudaEventQuery) costs more than the clock read used here,
so on a GPU machine late grows by about one probe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

TARGET_US = 10.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ready-us", type=float, nargs="+", default=[0, 1, 5, 20, 100, 1000],
                   help="when the polled condition becomes true, after the wait starts (us)")
    p.add_argument("--iters", type=int, default=2000, help="waits per row")
    p.add_argument("--policies", nargs="+", default=["legacy", "fast"])
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def provenance() -> dict:
    import torch

    from pyengine.core import provenance as prov

    return prov.record(torch.device("cpu"))


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.machine()} {model or platform.processor()}, {os.cpu_count()} cores, " \
           f"Linux {platform.release()}, load average {load} (other work shares the cores)"


def main(argv=None) -> int:
    args = parse_args(argv)
    from pyengine._native import native

    C = native()
    rows = []
    for ready in args.ready_us:
        for policy in args.policies:
            iters = max(20, min(args.iters, int(2e6 / max(ready, 1.0))))  # <= ~2 s per row
            C._poll_overhead(ready, min(iters, 50), policy)  # warm-up (page-in, frequency)
            r = C._poll_overhead(ready, iters, policy)
            # mean: what an op costs on average here, preemptions by other work included;
            # p50: the typical op, which preemptions of this shared machine do not move.
            r["meets_target_mean"] = r["late_us_mean"] <= TARGET_US
            r["meets_target_p50"] = r["late_us_p50"] <= TARGET_US
            rows.append(r)
    env = {**provenance(), "machine": machine()}
    out = {"env": env, "target_late_us": TARGET_US, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for key, value in env.items():
        print(f"# {key}: {value}")
    header = ["ready after (us)", "policy", "iters", "late mean", "late p50", "late p99",
              "late max", "cpu/wait (us)", "probes", f"<= {TARGET_US:g} us (mean / p50)"]
    table = [[f"{r['ready_after_us']:g}", r["policy"], str(r["iters"]),
              f"{r['late_us_mean']:.2f}", f"{r['late_us_p50']:.2f}", f"{r['late_us_p99']:.2f}",
              f"{r['late_us_max']:.2f}", f"{r['cpu_us_mean']:.2f}", f"{r['probes_mean']:.1f}",
              ("yes" if r["meets_target_mean"] else "no") + " / " +
              ("yes" if r["meets_target_p50"] else "no")] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
