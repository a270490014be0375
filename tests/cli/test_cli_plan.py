"""`pyengine plan` / `pyengine simulate` end to end."""

import json
import subprocess
import sys

import pytest

from pyengine.cli.main import main


def test_plan_text(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "device profile: seed32g" in out and "default profile" in out
    assert "Per GPU" in out and "Verdicts" in out
    assert "27.1/36.4/36.4%" in out and "does not hold" in out


def test_plan_json_keys(capsys):
    assert main(["plan", "--json", "--device", "h100"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"gpus", "load_balance", "predicted", "verdicts", "baselines", "device"} <= set(data)
    assert data["device"]["name"] == "h100"
    for g in data["gpus"]:
        assert {"index", "flops", "weight_bytes", "activation_bytes", "sent_bytes", "recv_bytes", "busy_s"} <= set(g)
    assert {"shares", "max_diff_pct"} <= set(data["load_balance"])
    assert {"latency_s", "throughput_tokens_per_s", "bubble_fraction", "utilization"} <= set(data["predicted"])


def test_plan_search(capsys):
    assert main(["plan", "--search", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Plan search" in out and "Winner by latency" in out and "vs your config" in out


@pytest.mark.slow  # a subprocess
def test_bad_config_exit_2_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hardware": {"num_gpus": 3, "gpu_memory_gb": 32},\n "model": }')
    r = subprocess.run([sys.executable, "-m", "pyengine", "plan", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2, column" in lines[0]


@pytest.mark.parametrize("args,words", [
    (["--device", "b200"], "neither a preset"),
    (["--config", "/nonexistent/x.json"], "cannot be read"),
])
def test_bad_inputs_exit_2(capsys, args, words):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_bad_field_names_path(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    from pyengine.core.spec import load_spec
    d = load_spec(None).to_dict()
    d["schedule"]["micro_batches"] = 0
    cfg.write_text(json.dumps(d))
    assert main(["plan", "--config", str(cfg)]) == 2
    assert "schedule.micro_batches" in capsys.readouterr().err


def test_simulate_writes_files(tmp_path, capsys):
    png, trace = tmp_path / "g.png", tmp_path / "t.json"
    assert main(["simulate", "--schedule", "asready", "--png", str(png), "--trace", str(trace)]) == 0
    captured = capsys.readouterr()
    assert "makespan" in captured.out
    assert captured.err.splitlines() == [f"wrote trace {trace}", f"wrote chart {png}"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(trace.read_text())
    assert any(e["ph"] == "X" for e in data["traceEvents"])


def test_simulate_json_tiny(capsys):
    from importlib import resources
    cfg = resources.files("pyengine").joinpath("configs/tiny_cpu.json")
    assert main(["simulate", "--config", str(cfg), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["makespan_s"] > 0 and data["metrics"]["bubble_fraction"] >= 0 and data["spans"]


def test_top_without_search_is_refused(capsys):
    assert main(["plan", "--top", "3"]) == 2
    assert "--top = 3: needs --search" in capsys.readouterr().err


def test_plan_refuses_a_decode_past_the_models_positions(capsys, monkeypatch):
    """As generate does: the seeded model has 32,768 positions and prompts of 1,024 tokens."""
    from helpers import packaged_config
    import pyengine.predict.planner as planner

    model = packaged_config("seed_model_3gpu.json")
    monkeypatch.setattr(planner, "plan", lambda *a, **k: pytest.fail("priced before refusing"))
    assert main(["plan", "--config", model, "--max-new-tokens", "40000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--max-new-tokens = 40000" in err
    assert "1024 tokens (model.seq_len) + 40000 new exceed the model's 32768 positions" in err
    assert main(["plan", "--config", model, "--max-new-tokens", "31745"]) == 2  # one past
    capsys.readouterr()
    monkeypatch.undo()
    assert main(["plan", "--config", model, "--max-new-tokens", "31744", "--json"]) == 0  # exactly fills them
