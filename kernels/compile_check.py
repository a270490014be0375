"""Compile every job for a GPU architecture and judge the resources: `pyengine kernels compile`.

Compiling runs in worker processes (`python -m pyengine.kernels.compile_check IN OUT`)
started without TRITON_INTERPRET: triton.jit decides between compiler and interpreter
when a kernel module is imported, and the interpreter's InterpretedFunction cannot be
compiled (re-wrapping its `.fn` in a JITFunction fails too: the helpers it calls,
grouped_tile and the rmsnorm chunks, stay InterpretedFunctions in the module globals,
which the code generator rejects). Workers also keep the stand-in driver out of the
caller's process, and run the jobs on several cores.

Rules (per row): it compiles; static + dynamic shared memory <= the architecture's limit
(kernels/smem.py); no spills in bf16/fp16 (fp32 spills are reported, not failed); on
sm_100 tensor memory <= 512 columns; and the run-time shared-memory estimate agrees with
the compiled figure about the limit. A candidate the run-time rule prunes is reported
(ok false, pruned true) but does not gate: the tuner never tries it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyengine.kernels import smem
from pyengine.kernels.compile_jobs import KERNELS, Job, estimate

TMEM_COLUMNS = 512  # tensor memory per SM on sm_100: 128 lanes x 512 columns of 32 bit
LOW_PRECISION = ("bf16", "fp16")


class ArchUnsupported(RuntimeError):
    """The installed Triton cannot compile for the requested architecture."""


def run_jobs(jobs: list[Job], arch: int, workers: int | None = None, timeout: float = 1800,
             advance=lambda n: None) -> list[dict]:
    """Rows for `jobs` (in order), compiled in `workers` processes (default: one per core).
    advance(n) is called as each worker's n jobs come back (a progress bar's hook).

    Each worker first compiles a one-line probe kernel; if that fails, ArchUnsupported.
    """
    smem.shared_limit(arch)  # an unknown arch fails here, naming the known ones
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    shares = [order[w::workers] for w in range(workers)]  # costliest first, dealt round-robin
    rows: list[dict | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        procs = [_start_worker(Path(tmp) / f"w{w}", arch, [jobs[i] for i in share])
                 for w, share in enumerate(shares)]
        try:
            for share, (proc, base) in zip(shares, procs):
                for i, row in zip(share, _collect(proc, base, arch, timeout)):
                    rows[i] = row
                advance(len(share))
        finally:
            for proc, _ in procs:  # only on error: a worker still running is ours to end
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return rows


def _start_worker(base: Path, arch: int, jobs: list[Job]):
    """One `python -m pyengine.kernels.compile_check` on `jobs`; output goes to files (a
    failing ptxas prints its whole input, which could fill a pipe)."""
    base.with_suffix(".in").write_text(json.dumps({"arch": arch, "jobs": [j.to_dict() for j in jobs]}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(base.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pyengine.kernels.compile_check",
                                 str(base.with_suffix(".in")), str(base.with_suffix(".out"))],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, base


def _collect(proc, base: Path, arch: int, timeout: float) -> list[dict]:
    proc.wait(timeout=timeout)
    out = base.with_suffix(".out")
    if proc.returncode != 0 or not out.is_file():
        log = base.with_suffix(".log").read_text(errors="replace").strip()
        raise RuntimeError(f"compile worker exited {proc.returncode}: {log[-2000:]}")
    data = json.loads(out.read_text())
    if "unsupported" in data:
        raise ArchUnsupported(f"the installed Triton cannot compile for sm_{arch}: {data['unsupported']}")
    return data["rows"]


def probe_arch(arch: int) -> str | None:
    """None if the installed Triton compiles for sm_<arch>, else why not."""
    try:
        run_jobs([], arch, workers=1)
    except ArchUnsupported as e:
        return str(e)
    return None


def gate_failures(rows: list[dict]) -> list[dict]:
    """Rows that make the check fail: not ok and not a candidate pruned at run time."""
    return [r for r in rows if not r["ok"] and r["gates"]]


# ---- in the worker process -----------------------------------------------------------------
def compile_rows(jobs: list[Job], arch: int) -> list[dict]:
    """Compile in this process (its kernel modules must not be interpreted)."""
    kernels = {name: getattr(importlib.import_module(mod), name) for name, mod in KERNELS.items()}
    for job in jobs:
        if job.kernel not in kernels:
            raise ValueError(f"job kernel={job.kernel!r}: must be one of {sorted(kernels)}")
    return [_row(job, kernels[job.kernel], arch) for job in jobs]


def _row(job: Job, kernel, arch: int) -> dict:
    from pyengine.kernels.compile_target import compile_kernel, resources

    est = estimate(job, arch)
    row = dict(kernel=job.kernel, variant=job.variant, dtype=job.dtype, config=job.config,
               source=job.source, shapes=job.shapes, arch=arch, estimate_bytes=est,
               pruned=job.source == "candidate" and est is not None and est > smem.shared_limit(arch))
    row["gates"] = not row["pruned"]
    try:
        res = resources(compile_kernel(kernel, job.args, job.meta, arch), arch)
    except Exception as e:  # reported as the row's failure, with Triton's own message
        msg = " ".join(str(e).split())[:400]
        return {**row, "shared_bytes": None, "registers": None, "spill_bytes": None,
                "mma": None, "tmem_cols": None, "ok": False,
                "reason": f"does not compile: {type(e).__name__}: {msg}", "notes": ""}
    row.update(shared_bytes=res.shared_bytes, registers=res.registers,
               spill_bytes=res.spill_bytes, mma=res.mma, tmem_cols=res.tmem_cols)
    problems, notes = judge(row, arch)
    return {**row, "ok": not problems, "reason": "; ".join(problems), "notes": "; ".join(notes)}


def judge(row: dict, arch: int) -> tuple[list[str], list[str]]:
    """(problems, notes) of a compiled row by the rules in the module docstring."""
    limit, shared, est = smem.shared_limit(arch), row["shared_bytes"], row["estimate_bytes"]
    problems, notes = [], []
    if shared > limit:
        problems.append(f"shared {shared} B > sm_{arch} limit {limit} B")
    if row["spill_bytes"] and row["dtype"] in LOW_PRECISION:
        problems.append(f"spills {row['spill_bytes']} B/thread in {row['dtype']}")
    elif row["spill_bytes"]:
        notes.append(f"spills {row['spill_bytes']} B/thread (allowed in fp32)")
    if row["tmem_cols"] > TMEM_COLUMNS:
        problems.append(f"tensor memory {row['tmem_cols']} columns > {TMEM_COLUMNS}")
    if est is not None and (est > limit) != (shared > limit):
        problems.append(f"run-time estimate {est} B and compiled {shared} B disagree about the "
                        f"{limit} B limit (kernels/smem.py needs updating)")
    if row["pruned"]:
        problems.append("pruned at run time")
    return problems, notes


def _cost(job: Job) -> int:
    """Rough compile cost for load balancing: the tile volume of a GEMM, else small."""
    c = job.config
    return c.get("BLOCK_M", 16) * c.get("BLOCK_N", 16) * c.get("BLOCK_K", 16) * c.get("num_stages", 1)


def _probe(arch: int) -> None:
    """Compile a one-line kernel for sm_<arch>; raises when Triton cannot target it."""
    import triton
    import triton.language as tl
    from pyengine.kernels.compile_target import compile_kernel

    @triton.jit
    def probe_kernel(p):
        tl.store(p, tl.load(p) + 1)

    compile_kernel(probe_kernel, ["*fp32"], {}, arch)


def _worker(argv: list[str]) -> int:
    src, dst = argv
    data = json.loads(Path(src).read_text())
    try:
        _probe(data["arch"])
    except Exception as e:  # reported to the caller as ArchUnsupported
        Path(dst).write_text(json.dumps({"unsupported": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}))
        return 0
    jobs = [Job(**j) for j in data["jobs"]]
    Path(dst).write_text(json.dumps({"rows": compile_rows(jobs, data["arch"])}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
