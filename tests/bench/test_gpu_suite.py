"""bench/gpu_suite.sh's dry run on CPU: the step order, the deadline clamp (a step over the
deadline is cut, later ones skipped), exactly two files in $OUT rewritten after every step, and a
SIGKILL mid-run leaves a valid archive and summary."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import suite_report  # noqa: E402


def _env(tmp_path, deadline):
    return dict(os.environ, DRY_RUN="1", DEADLINE_S=str(deadline), DRY_STEP_S="1,2",
                OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PY=sys.executable)


def _summary(tmp_path):
    """The step lines, after the deadline line."""
    head, *lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert head.startswith("deadline ")
    return lines


def _archived_summary(tmp_path):
    with tarfile.open(tmp_path / "out" / "suite.tar.gz") as t:
        return t.extractfile("work/summary.txt").read().decode().splitlines()[1:]


def test_dry_run_keeps_order_clamps_to_the_deadline_and_leaves_two_files(tmp_path):
    subprocess.run(["bash", str(ROOT / "bench/gpu_suite.sh")], env=_env(tmp_path, 6), check=True,
                   timeout=60, capture_output=True)
    lines = _summary(tmp_path)
    names = [name for name, _, _ in suite_report.steps(sys.executable, "w")]
    assert [line.split()[0] for line in lines] == names
    states = [line.split()[1] for line in lines]
    assert states[:3] == ["rc=0"] * 3  # 1 + 2 + 1 s fit in 6 s less the slack
    assert states[3] == "cut" and set(states[4:]) == {"skipped"}
    assert sorted(os.listdir(tmp_path / "out")) == ["suite.tar.gz", "summary.txt"]
    assert _archived_summary(tmp_path) == lines


def test_sigkill_mid_run_leaves_a_valid_archive_and_summary(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench/suite_report.py"), "--out",
                             str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--dry-run",
                             "--deadline-s", "60"], env=_env(tmp_path, 60),
                            stdout=subprocess.DEVNULL)
    summary = tmp_path / "out" / "summary.txt"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (summary.exists() and len(_summary(tmp_path)) >= 2):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = _summary(tmp_path)
    assert 2 <= len(lines) < len(suite_report.steps(sys.executable, "w"))
    archived = _archived_summary(tmp_path)  # the archive is renamed first: it may be one step ahead
    assert archived[:len(lines)] == lines and len(archived) - len(lines) in (0, 1)
    assert sorted(os.listdir(tmp_path / "out")) == ["suite.tar.gz", "summary.txt"]


def test_sanitizer_refusal_is_recorded_not_failed():
    assert suite_report._refused("sanitizer", 1, "Error: Target application not supported")
    assert not suite_report._refused("sanitizer", 1, "========= Invalid __global__ read")
    assert not suite_report._refused("build", 127, "not supported")
