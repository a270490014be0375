"""`pyengine generate` as a user runs it: the seeded model of layers against an independent greedy
loop written here (a float64 forward of the whole sequence per new token, no cache), bad input
refused in one line before any rank starts, and a rank that dies mid-decode named."""

from __future__ import annotations

import json
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
TINY = packaged_config("tiny_cpu.json")


@pytest.fixture
def unbatched(tmp_path) -> str:
    """The seeded model's config without batch_size and seq_len: the prompts give them."""
    cfg = json.loads(open(MODEL).read())
    del cfg["model"]["batch_size"], cfg["model"]["seq_len"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def pyengine(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], capture_output=True, text=True,
                          timeout=timeout)


def greedy(spec: DeploymentSpec, w: dict, prompt: torch.Tensor, new: int) -> list[int]:
    """The reference's forward of the whole sequence, once per new id: its argmax appended."""
    m = spec.model
    seq = prompt.clone()
    for _ in range(new):
        logits = references.decoder_model(w, seq[None], layers=m.num_layers, heads=m.heads, kv=m.kv_heads,
                                          top_k=m.top_k, eps=m.norm_eps, theta=m.rope_theta)
        seq = torch.cat([seq, logits[-1].argmax().reshape(1)])
    return seq.tolist()


@pytest.mark.slow
def test_seeded_model_generates_what_an_independent_loop_does(tmp_path, unbatched):
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 250, (n,), generator=g) for n in (6, 3, 9)]
    torch.save(prompts, tmp_path / "p.pt")
    r = pyengine("generate", "--config", unbatched, "--tokens", str(tmp_path / "p.pt"), "--max-new-tokens", "8",
                 "--micro-batches", "2", "--json", "--dump", str(tmp_path / "d"), "--trace", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    assert [f"wrote trace {tmp_path / 't.json'}", f"wrote dump {tmp_path / 'd'}"] == [
        line for line in r.stderr.splitlines() if line.startswith("wrote ")]
    out = json.loads(r.stdout)
    spec = DeploymentSpec.from_json((tmp_path / "d" / "spec.json").read_text())
    assert spec.model.num_layers == 21 and (spec.model.batch_size, spec.model.seq_len) == (3, 9)
    got = [s.tolist() for s in torch.load(tmp_path / "d" / "generated.pt")]
    w = {k: t.double() for k, t in init_weights(spec, 0).items()}  # once: the loop reads them 24 times
    assert got == out["generated"] == [greedy(spec, w, p, 8) for p in prompts]
    assert out["ttft_s"] > 0 and out["itl_p50_s"] > 0 and out["new_tokens"] == 24
    assert set(out["weight_bytes_per_step"]) == {"1", "2"} and out["decode_balance"] > 0
    assert torch.load(tmp_path / "d" / "first_logits.pt").shape == (8, spec.model.vocab_size)
    assert out["graphs"].startswith("eager decode: CUDA graphs need a GPU; the ranks run on cpu")


@pytest.mark.slow
def test_a_rank_dying_mid_decode_is_named():
    r = pyengine("generate", "--config", MODEL, "--max-new-tokens", "4", "--warmup", "0", "--timeout", "5",
                 "--inject-fault", "2:l3.s1.mb0.COMPUTE:exit", timeout=180)
    assert r.returncode == 1
    assert r.stderr.startswith("pyengine generate: rank 2 failed in action l3.s1.mb0.COMPUTE: exited"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def no_ranks(monkeypatch):
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("a rank started"))


def refused(capsys, *args) -> str:
    assert main(["generate", *args]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and cap.out == "", cap.err
    return lines[0]


@pytest.mark.parametrize("prompts,what", [
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64)], "non-empty"),
    ([torch.tensor([1, 40000, 5, 6, 7])], "outside the vocabulary"),
    ([torch.tensor([0.5, 1.0])], "integers"),
])
def test_bad_prompts_are_refused(tmp_path, capsys, no_ranks, unbatched, prompts, what):
    torch.save(prompts, tmp_path / "p.pt")
    assert what in refused(capsys, "--config", unbatched, "--tokens", str(tmp_path / "p.pt"),
                           "--max-new-tokens", "2")


def test_a_config_batch_must_agree_with_the_prompts(tmp_path, capsys, no_ranks):
    torch.save([torch.tensor([1, 2, 3])], tmp_path / "p.pt")
    line = refused(capsys, "--config", MODEL, "--tokens", str(tmp_path / "p.pt"), "--max-new-tokens", "2")
    assert "model.seq_len = 1024: disagrees with the prompts (3)" in line


@pytest.mark.parametrize("n", ["0", "-3", "10000000"])
def test_bad_max_new_tokens(capsys, no_ranks, n):
    assert "--max-new-tokens" in refused(capsys, "--config", MODEL, "--max-new-tokens", n)


def test_past_the_models_positions(tmp_path, capsys, no_ranks, unbatched):
    torch.save([torch.zeros(32760, dtype=torch.int64)], tmp_path / "p.pt")  # max_positions 32768
    line = refused(capsys, "--config", unbatched, "--tokens", str(tmp_path / "p.pt"), "--max-new-tokens", "9")
    assert "exceed the model's 32768 positions" in line


def test_the_block_cannot_generate(capsys, no_ranks):
    assert "model.num_layers" in refused(capsys, "--config", TINY, "--max-new-tokens", "2")


def test_a_cache_that_does_not_fit(capsys, no_ranks):
    assert "does not fit" in refused(capsys, "--config", MODEL, "--no-scale", "--max-new-tokens", "2")


def test_rank_0_draws_one_bar_over_the_steps_unless_json(tmp_path, capsys, monkeypatch, unbatched):
    """On a terminal rank 0 advances a bar once per step (the prefill, then each decode step)."""
    from helpers import RecordingBars
    from pyengine.execute import generate_measure

    monkeypatch.setattr(generate_measure, "progress", recording := RecordingBars())
    tokens = tmp_path / "p.pt"
    torch.save([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], tokens)
    args = ["generate", "--config", unbatched, "--tokens", str(tokens), "--max-new-tokens", "3",
            "--backend", "local", "--warmup", "0"]
    assert main(args) == 0
    drawn = recording.drawn()
    assert len(recording.bars) == 3 and len(drawn) == 1 and drawn[0].total == 3 and len(drawn[0].steps) == 3
    recording.bars.clear()
    assert main([*args, "--json"]) == 0
    assert recording.bars and not recording.drawn()


def test_graphs_on_where_they_cannot_be_captured_is_refused(capsys, no_ranks):
    line = refused(capsys, "--config", MODEL, "--max-new-tokens", "2", "--graphs", "on", "--backend", "gloo")
    assert line.endswith("graphs = 'on': CUDA graphs need a GPU; the ranks run on cpu"), line


def _few_descriptors():
    """In the child before exec: at most 256 open files (the usual default is 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))


@pytest.mark.slow
def test_twenty_thousand_prompts_on_gloo_under_a_low_file_limit(tmp_path):
    """The prompts travel to the rank processes as one packed tensor: sent one tensor each, every
    prompt took a shared-memory file descriptor and 1,500 already broke a 1024 limit."""
    from helpers import small_spec

    spec = json.loads(small_spec(model={"num_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
                                 schedule={"micro_batches": 1}).to_json())
    del spec["model"]["batch_size"], spec["model"]["seq_len"]
    (tmp_path / "c.json").write_text(json.dumps(spec))
    torch.save([torch.tensor([i % 37]) for i in range(20_000)], tmp_path / "p.pt")
    r = subprocess.run([sys.executable, "-m", "pyengine", "generate", "--config", str(tmp_path / "c.json"),
                        "--tokens", str(tmp_path / "p.pt"), "--max-new-tokens", "1", "--warmup", "0",
                        "--backend", "gloo", "--json", "--dump", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=300, preexec_fn=_few_descriptors)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["sequences"] == 20_000
    assert len(torch.load(tmp_path / "d" / "generated.pt")) == 20_000


def _small_layered(tmp_path, **schedule) -> str:
    """A small model of 2 layers, its batch left to the prompts (micro_batches 4 by default)."""
    from helpers import small_spec

    spec = json.loads(small_spec(model={"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                                 schedule=schedule).to_json())
    del spec["model"]["batch_size"], spec["model"]["seq_len"]
    (tmp_path / "c.json").write_text(json.dumps(spec))
    return str(tmp_path / "c.json")


@pytest.mark.parametrize("lengths", [(1,), (2,), (1, 1, 1)])  # fewer tokens than the 4 micro-batches
def test_prompts_shorter_than_the_micro_batches_prefill_in_fewer_chunks(tmp_path, capsys, lengths):
    torch.save([torch.arange(n) + 3 for n in lengths], tmp_path / "p.pt")
    assert main(["generate", "--config", _small_layered(tmp_path), "--tokens", str(tmp_path / "p.pt"),
                 "--max-new-tokens", "3", "--warmup", "0", "--backend", "local", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sequences"] == len(lengths) and out["new_tokens"] == 3 * len(lengths)


def test_micro_batches_flag_is_applied_before_the_config_is_checked(tmp_path, capsys, no_ranks):
    """The flag names itself when it is what breaks a rule; a config the flag repairs is accepted."""
    import argparse

    from pyengine.cli.run import resolve_spec

    cfg = json.loads(open(TINY).read())
    cfg["schedule"]["micro_batches"] = 100  # above the 48 tokens of 2 x 24
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    args = argparse.Namespace(config=str(tmp_path / "m.json"), schedule=None, micro_batches=3, timeout=None)
    assert resolve_spec(args).schedule.micro_batches == 3
    assert main(["run", "--config", str(tmp_path / "m.json"), "--micro-batches", "49"]) == 2
    assert "--micro-batches = 49: must be <= the token count" in capsys.readouterr().err


def test_one_new_token_reports_no_decode_instead_of_nan(tmp_path, capsys):
    """With --max-new-tokens 1 the prefill makes every new token: no decode figures to show."""
    torch.save([torch.tensor([3, 4])], tmp_path / "p.pt")
    assert main(["generate", "--config", _small_layered(tmp_path), "--tokens", str(tmp_path / "p.pt"),
                 "--max-new-tokens", "1", "--warmup", "0", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "no decode step ran" in out and "nan" not in out and "inf" not in out


def test_an_eos_id_outside_the_vocabulary_is_a_note_not_a_refusal(tmp_path, capsys):
    """OLMoE's default eos_token_id (50279) beside a smaller vocabulary: transformers runs it, the id
    can never be drawn, so generation runs to --max-new-tokens and says why."""
    path = _small_layered(tmp_path)
    cfg = json.loads(open(path).read())
    cfg["model"]["eos_token_ids"] = [50279]
    open(path, "w").write(json.dumps(cfg))
    torch.save([torch.arange(3) + 3], tmp_path / "p.pt")
    assert main(["generate", "--config", path, "--tokens", str(tmp_path / "p.pt"), "--max-new-tokens", "3",
                 "--warmup", "0", "--backend", "local", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["new_tokens"] == 3
    assert "eos_token_ids [50279] lie outside the vocabulary" in cap.err
