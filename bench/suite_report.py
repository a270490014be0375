"""The GPU suite's runner: steps in order of value under one overall deadline, and after every
step an archive of the work dir plus a one-line-per-step summary, both replaced atomically in
$OUT, so a kill at any moment leaves everything that finished (exactly two files in $OUT).

Standard library only: it runs on the GPU machine before anything is built.

    python3 bench/suite_report.py --out DIR --work DIR [--deadline-s 540] [--dry-run]
    DRY_RUN=1 DRY_STEP_S="1,2" ...   # fake steps: sleep DRY_STEP_S seconds (cycled), echo the command
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

MIN_STEP_S = 1.0  # a step with less time left than this is skipped, not started
SLACK_S = 5.0  # kept back from the deadline for the last archive


FIRST_CONTACT = [
    ("decode_attention", "tests/kernels/test_kernels_decode_attention.py"),
    ("qk_rope_cache", "tests/kernels/test_kernels_qk_rope_cache.py"),
    ("router_topk", "tests/kernels/test_kernels_router_topk.py"),
    ("moe_align", "tests/kernels/test_kernels_moe_align.py"),
    ("expert_shard", "tests/kernels/test_kernels_expert_shard_prepared.py"),
    ("mla", "tests/kernels/test_kernels_mla_rope_cache.py tests/kernels/test_kernels_decode_attention_mla.py"),
]
"""The decode path's kernels, new to a GPU: each file alone, under CUDA_LAUNCH_BLOCKING=1 and a short
limit, so a kernel that faults or hangs is named by its step and the suite goes on."""
FIRST_CONTACT_S = 40


def pytest_cmd(py: str, args: str) -> str:
    """-P: the repository root is not put on sys.path, so its top-level kernels/ shadows nothing."""
    return f"{py} -P -m pytest -q -rs -p no:cacheprovider {args}"


def first_contact(py: str) -> list[tuple[str, float, str]]:
    return [(f"first_{name}", FIRST_CONTACT_S, "CUDA_LAUNCH_BLOCKING=1 " + pytest_cmd(py, f"-v -x {path}"))
            for name, path in FIRST_CONTACT]


def steps(py: str, work: str) -> list[tuple[str, float, str]]:
    """(name, own limit in s, shell command), most valuable first."""
    prof = f"{work}/device_profile.json"
    decode = (f"{py} bench/bench_decode.py --sequences 1 64 256 --groups 2 --prompt 128 --steps 10 "
              "--count --json")
    return [
        ("env", 30, "nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv; "
                    f"{py} -c 'import sys, torch, triton, numpy; print(sys.version, torch.__version__, "
                    "torch.version.cuda, triton.__version__, numpy.__version__)'; git rev-parse HEAD; date -Is"),
        ("build", 180, f"{py} -m pip install -q --no-build-isolation --no-deps -e ."),
        *first_contact(py),
        ("graphs", 120, pytest_cmd(py, "-v -x tests/execute/test_decode_graphs_gpu.py")),
        ("bench_decode", 150, decode),
        ("bench_kernels_decode", 60, f"{py} bench/bench_kernels.py --decode --json"),
        ("calibrate", 60, f"{py} -m pyengine calibrate --out {prof} --json"),
        ("plan_measured", 20, f"{py} -m pyengine plan --config pyengine/configs/seed_model_3gpu.json "
                              f"--device {prof} --json"),
        ("test_rest", 150, pytest_cmd(py, "-m gpu --ignore=tests/kernels --durations=10")),
        ("bench_kernels", 60, f"{py} bench/bench_kernels.py --json"),
        ("kernels_gpu", 120, pytest_cmd(py, "-m gpu --durations=10 tests/kernels")),
        ("run_seed", 60, f"{py} -m pyengine run --json --iters 10"),
        ("bench_overlap", 60, f"{py} bench/bench_overlap.py --json"),
        ("tune", 120, f"{py} -m pyengine tune --out {work}/tuned_configs"),
        # Without PYTORCH_NO_CUDA_MEMORY_CACHING=1 the caching allocator hides overruns inside blocks.
        ("sanitizer", 240, "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck "
                           "--error-exitcode 1 " + pytest_cmd(py, "-m gpu -x tests/kernels")),
    ]


def _refused(name: str, rc: int, err: str) -> bool:
    """compute-sanitizer cannot attach on some machines: that is recorded, not a failure."""
    return name == "sanitizer" and rc != 0 and ("not supported" in err.lower() or "refused" in err.lower()
                                                or "permission" in err.lower() or rc == 127)


def _atomic(out: Path, name: str, write) -> None:
    """Write beside $OUT (same filesystem, so the rename is atomic and a kill mid-write leaves no
    third file in $OUT); inside $OUT only when its parent is not writable."""
    parent = out.resolve().parent
    tmp = (parent if os.access(parent, os.W_OK) else out) / f".{out.name}.{name}.tmp"
    write(tmp)
    os.replace(tmp, out / name)


def publish(out: Path, work: Path, lines: list[str]) -> None:
    """Rewrite $OUT/suite.tar.gz (the work dir) and $OUT/summary.txt, each by one rename."""
    def tar(tmp):
        with tarfile.open(tmp, "w:gz") as t:
            t.add(work, arcname=work.name)
    _atomic(out, "suite.tar.gz", tar)
    _atomic(out, "summary.txt", lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))


def _tail(path: Path, n: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-n:])[:300]


def run_step(name: str, limit: float, cmd: str, work: Path) -> str:
    """Run one step under `limit` s, logs in the work dir; its summary line."""
    start = time.monotonic()
    err_path = work / f"{name}.err"
    with open(work / f"{name}.out", "w") as o, open(err_path, "w") as e:
        proc = subprocess.Popen(["bash", "-c", cmd], stdout=o, stderr=e, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "cut"
    secs = time.monotonic() - start
    if rc == 0:
        return f"{name} rc=0 {secs:.1f}s"
    if rc == "cut":
        return f"{name} cut at {limit:.1f}s (deadline clamp) {secs:.1f}s"
    state = "refused" if _refused(name, rc, _tail(err_path, 20)) else f"rc={rc}"
    return f"{name} {state} {secs:.1f}s err: {_tail(err_path)}"


def _fake(cmd: str, i: int) -> str:
    durations = [float(s) for s in os.environ.get("DRY_STEP_S", "1").split(",")]
    return f"sleep {durations[i % len(durations)]}; echo {_quote(cmd)}"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=os.environ.get("WORK", "/tmp/gpu_suite"))
    p.add_argument("--deadline-s", type=float, default=float(os.environ.get("DEADLINE_S", 540)))
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1")
    p.add_argument("--python", default=os.environ.get("PY", sys.executable))
    a = p.parse_args(argv)
    if a.deadline_s <= 0:
        print(f"--deadline-s={a.deadline_s}: must be > 0", file=sys.stderr)
        return 2
    start = time.monotonic()
    out, work = Path(a.out), Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = [f"deadline {a.deadline_s:.0f}s overall"]
    slack = min(SLACK_S, a.deadline_s * 0.1)
    for i, (name, own, cmd) in enumerate(steps(a.python, str(work))):
        left = a.deadline_s - slack - (time.monotonic() - start)
        if left < MIN_STEP_S:
            lines.append(f"{name} skipped ({left:.1f}s left) 0.0s")
        else:
            lines.append(run_step(name, min(own, left), _fake(cmd, i) if a.dry_run else cmd, work))
        lines[-1] += f" (left {a.deadline_s - (time.monotonic() - start):.0f}s)"
        (work / "summary.txt").write_text("".join(line + "\n" for line in lines))
        publish(out, work, lines)
        print(lines[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
