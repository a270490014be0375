"""Generation from a checkpoint against transformers' own `generate(do_sample=False)`: tiny random
Mixtral / Qwen3-MoE / OLMoE models of 3 layers, 3 prompts of different lengths in one batch, the
end-of-sequence id respected, TP and EP, 1 and 2 groups, on threads and (the CLI) on gloo processes.

transformers generates each prompt alone (a batch of one needs no padding, so its greedy ids are
exactly what a correctly masked batch gives); the engine generates all three at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import on_threads
from tiny_hf import FAMILIES, FAMILY_CONFIG, fit_experts
from pyengine.execute.engine import Engine
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.transport.local import LocalTransport

PROMPTS = [torch.tensor([3, 17, 5, 30, 8]), torch.tensor([12, 4]), torch.tensor([9, 1, 22, 35, 6, 14, 27, 2])]
NEW = 7
LAYOUTS = {
    "tp": [{"name": "embed", "gpus": [0]}, {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2},
           {"name": "output", "gpus": [0]}],
    "ep-with-gpu0": [{"name": "embed", "gpus": [0]},
                     {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert",
                      "expert_ids": [[4], [0, 2], [1, 3]]},
                     {"name": "output", "gpus": [0]}],
}


@torch.no_grad()
def transformers_generate(model, eos: int | None, prompts=PROMPTS):
    """Per prompt: transformers' greedy ids (prompt + new), and the first prompt's per-step logits."""
    seqs, first = [], None
    for i, p in enumerate(prompts):
        out = model.generate(p[None], max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        seqs.append(out.sequences[0])
        if i == 0:
            first = torch.cat(out.logits)
    return seqs, first


def engine_generate(spec, source, prompts=PROMPTS):
    transports = LocalTransport.create(3, "cpu", 30)

    def body(r):
        e = Engine(spec, transports[r], source=source)
        return e.generate(prompts, NEW), e.last_generation.first_logits

    return on_threads(body, timeout_s=180)


CASES = [(f, lay, m) for f in FAMILIES for lay in LAYOUTS for m in (1, 2)]


TRITON_CASES = [("qwen2_moe", "ep-with-gpu0", 2)]
"""On the Triton path too: its static decode step's fused QKV GEMM with q/k/v biases and no o bias."""


@pytest.mark.parametrize("family,layout_name,m", CASES, ids=[f"{f}-{lay}-m{m}" for f, lay, m in CASES])
def test_generate_matches_transformers(checkpoint, layout_config, family, layout_name, m):
    check_generate(checkpoint, layout_config, family, layout_name, m)


@pytest.mark.parametrize("family,layout_name,m", TRITON_CASES)
def test_generate_on_the_triton_path_matches_transformers(checkpoint, layout_config, monkeypatch, family,
                                                          layout_name, m):
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    check_generate(checkpoint, layout_config, family, layout_name, m)


def check_generate(checkpoint, layout_config, family, layout_name, m):
    folder, model = checkpoint(family, **FAMILY_CONFIG.get(family, {}))
    source = open_checkpoint(folder)
    spec = deployment_spec(source.hf, layout_config(fit_experts(LAYOUTS[layout_name], family), m), whole=True,
                           batch=(len(PROMPTS), 8))
    free, _ = transformers_generate(model, None)
    eos = int(free[1][len(PROMPTS[1]) + 2])  # the second prompt's third new id: it must stop there
    spec = spec.replace(model={"eos_token_ids": [eos]})
    want, want_logits = transformers_generate(model, eos)
    out = engine_generate(spec, source)
    for rank_seqs, _ in out:  # every rank returns the same ids
        assert [s.tolist() for s in rank_seqs] == [s.tolist() for s in want]
    assert len(want[1]) < len(PROMPTS[1]) + NEW  # the eos id ended it early
    got_logits = out[0][1]
    assert got_logits.shape == want_logits.shape
    assert (got_logits - want_logits).abs().max() / want_logits.abs().max() < 1e-5


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_a_prefill_chunk_with_exactly_one_non_final_row(checkpoint, layout_config, layout_name):
    """Prompts of 1 and 2 tokens in one chunk (m = 1): rows [last, not last, last], so the output
    gather skips exactly one row, its edge case."""
    folder, model = checkpoint("mixtral")
    source = open_checkpoint(folder)
    prompts = [torch.tensor([7]), torch.tensor([12, 4])]
    spec = deployment_spec(source.hf, layout_config(LAYOUTS[layout_name], 1), whole=True, batch=(2, 2))
    want, want_logits = transformers_generate(model, None, prompts)
    out = engine_generate(spec.replace(model={"eos_token_ids": None}), source, prompts)
    for rank_seqs, _ in out:
        assert [s.tolist() for s in rank_seqs] == [s.tolist() for s in want]
    assert (out[0][1] - want_logits).abs().max() / want_logits.abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family,layout_name", [("mixtral", "ep-with-gpu0"), ("qwen3_moe", "tp"), ("olmoe", "tp"),
                                                ("deepseek_v3", "ep-with-gpu0"), ("qwen2_moe", "ep-with-gpu0"),
                                                ("gpt_oss", "ep-with-gpu0")])
def test_cli_generate_on_gloo_matches_transformers(checkpoint, layout_config, tmp_path, family, layout_name):
    folder, model = checkpoint(family, **FAMILY_CONFIG.get(family, {}))
    torch.save(PROMPTS, tmp_path / "prompts.pt")
    r = subprocess.run([sys.executable, "-m", "pyengine", "generate", "--weights", str(folder),
                        "--config", layout_config(fit_experts(LAYOUTS[layout_name], family), 2), "--tokens",
                        str(tmp_path / "prompts.pt"), "--max-new-tokens", str(NEW), "--warmup", "0",
                        "--json", "--dump", str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "gloo" and out["sequences"] == 3
    want, want_logits = transformers_generate(model, 2)  # the checkpoint's own eos_token_id
    got = torch.load(tmp_path / "d" / "generated.pt")
    assert [s.tolist() for s in got] == [s.tolist() for s in want] == out["generated"]
    logits = torch.load(tmp_path / "d" / "first_logits.pt")
    assert (logits - want_logits).abs().max() / want_logits.abs().max() < 1e-5
