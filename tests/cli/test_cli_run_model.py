"""`pyengine run` and `pyengine plan` on the seeded model of layers (pyengine/configs/seed_model_3gpu.json)
as a user runs them: the pipeline's logits against the test's own float64 reference, and the
memory verdicts that say how many layers fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import references
from helpers import packaged_config
from pyengine.cli.main import main
from pyengine.core.spec import DeploymentSpec
from pyengine.model.weights import init_weights

MODEL = packaged_config("seed_model_3gpu.json")


def pyengine(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_seeded_model_runs_on_cpu_and_matches_the_float64_reference(tmp_path):
    ids = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(2))  # 250: the CPU-scaled V
    torch.save(ids, tmp_path / "ids.pt")
    r = pyengine("run", "--config", MODEL, "--tokens", str(tmp_path / "ids.pt"), "--iters", "1",
                 "--warmup", "0", "--no-baselines", "--json", "--dump", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["check"]["ok"] and out["check"]["wrong"] == 0 and "head_dim 128→" in out["scaled"]
    spec = DeploymentSpec.from_json((tmp_path / "d" / "spec.json").read_text())
    m = spec.model
    assert m.num_layers == 21 and m.heads == 32 and m.kv_heads == 8
    want = references.decoder_model(init_weights(spec, 0), ids, layers=21, heads=32, kv=8, top_k=2,
                                    eps=m.norm_eps, theta=m.rope_theta)
    got = torch.load(tmp_path / "d" / "logits.pt").reshape(want.shape).double()
    assert (got - want).abs().max() / want.abs().max() < 1e-4


def test_plan_says_how_many_layers_fit(capsys):
    assert main(["plan", "--hf-config", packaged_config("hf/mixtral-8x7b")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"does not fit.*At most 21 of its 32 layers fit this layout", out.replace("\n", " "))
    assert main(["plan", "--config", MODEL, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers_fit"] == 21 and plan["ping_pong"]["bound_by"] == "experts"


def test_run_refuses_what_does_not_fit_and_says_what_would(capsys, monkeypatch):
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("a rank started"))
    assert main(["run", "--config", MODEL, "--no-scale"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"does not fit: .*; at most \d+ of the model's 21 layers fit", err[0])
