"""Every `# intended sync` mark in the package sits on a line that makes a host sync (what the GPU
test `test_runtime_syncs_gpu.py` accepts there), so no mark can excuse a line that does not sync
or outlive the sync it excused."""

from pathlib import Path

import pyengine

SYNC_CALLS = (".item()", ".tolist()", ".cpu()", ".synchronize()", "torch.nonzero(")
ROOT = Path(pyengine.__file__).parent


def marked_lines() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}:{n}", line) for p in sorted(ROOT.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if "# intended sync" in line and not line.lstrip().startswith("#")]


def test_every_mark_sits_on_a_syncing_call():
    lines = marked_lines()
    assert len(lines) >= 6, lines  # the runtime's, the EP stage's, the timer's and generation's
    bad = [where for where, line in lines if not any(c in line.split("#")[0] for c in SYNC_CALLS)]
    assert not bad, bad
