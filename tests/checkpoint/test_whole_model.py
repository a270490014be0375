"""The whole model from a checkpoint: the engine's logits for every decoder layer with its attention
against transformers' own `model(ids).logits`, for tiny random Mixtral / Qwen3-MoE / OLMoE models
(3 layers, GQA: 11 query heads over 1 kv head, head_dim 2; Qwen3's per-head and OLMoE's full q/k
norms). Threads over the local transport in process; the CLI (3 gloo processes) as a user runs it.

m = 3 over 2 x 11 tokens cuts chunks of 8, 7, 7: chunk 1 ends sequence 0 and starts sequence 1, so
the chunked prefill's KV cache (chunks 0 and 1 of sequence 0) and the sequence boundary inside a
chunk are both exercised."""

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
from pyengine.model.weights import rank_read_bytes
from pyengine.transport.local import LocalTransport

LAYOUTS = {
    "tp-even": [{"name": "embed", "gpus": [0]},
                {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2},
                {"name": "output", "gpus": [0]}],
    "tp-uneven-out2": [{"name": "embed", "gpus": [0]},
                       {"name": "experts", "gpus": [0, 1], "tensor_parallel_size": 2,
                        "shard_fractions": [0.3, 0.7]},
                       {"name": "output", "gpus": [2]}],
    "ep-with-gpu0": [{"name": "embed", "gpus": [0]},
                     {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert",
                      "expert_ids": [[0], [1, 3], [2, 4]]},
                     {"name": "output", "gpus": [0]}],
}


BATCH = {"batch_size": 2, "seq_len": 11}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def run_cli_json(folder, cfg: str, ids: torch.Tensor, tmp_path) -> tuple[dict, torch.Tensor]:
    """`python -m pyengine run --json` on `ids` as a user runs it (3 gloo processes, one batch, no
    warm-up or baselines). Asserts it exits 0 and that its own check passed on gloo; returns its JSON
    result and the output rank's dumped logits."""
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-m", "pyengine", "run", "--weights", str(folder), "--config", cfg,
                        "--tokens", str(tmp_path / "ids.pt"), "--iters", "1", "--warmup", "0",
                        "--no-baselines", "--json", "--dump", str(tmp_path / "dump")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["check"]["ok"] and out["backend"] == "gloo"
    return out, torch.load(tmp_path / "dump" / "logits.pt")


def engine_logits(spec, source, ids) -> torch.Tensor:
    transports = LocalTransport.create(3, "cpu", 30)
    out = on_threads(lambda r: Engine(spec, transports[r], source=source).forward(ids), timeout_s=120)
    return out[spec.stage("output").gpus[0]]


IDS = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(11))
CASES = [(fam, layout, m) for fam in FAMILIES for layout in LAYOUTS for m in (1, 3)]


@pytest.mark.parametrize("family,layout,m", CASES, ids=[f"{f}-{lay}-m{m}" for f, lay, m in CASES])
def test_whole_model_matches_transformers_fp32(checkpoint, layout_config, family, layout, m):
    folder, model = checkpoint(family, **FAMILY_CONFIG.get(family, {}))
    source = open_checkpoint(folder)
    spec = deployment_spec(source.hf, layout_config(fit_experts(LAYOUTS[layout], family), m, model=BATCH),
                           whole=True)
    assert spec.model.num_layers == 3 and (spec.model.kv_heads == 1 or spec.model.mla is not None)
    got = engine_logits(spec, source, IDS)
    with torch.no_grad():
        ref = model(IDS).logits
    assert got.shape == ref.shape == (2, 11, 37)
    assert rel_err(got, ref) <= 1e-5, rel_err(got, ref)


@pytest.mark.parametrize("boundary,kind", [("partials", "asready"), ("reduce_scatter", "gpipe")])
def test_other_boundaries_and_asready(checkpoint, layout_config, boundary, kind):
    folder, model = checkpoint("qwen3_moe", norm_topk_prob=True)
    source = open_checkpoint(folder)
    spec = deployment_spec(source.hf, layout_config(LAYOUTS["tp-even"], 4, boundary, kind, model=BATCH), whole=True)
    with torch.no_grad():
        ref = model(IDS).logits
    assert rel_err(engine_logits(spec, source, IDS), ref) <= 1e-5


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_whole_model_bf16_within_bf16_rounding(checkpoint, layout_config, family):
    """bf16: the engine's error against an fp32 run of the same (bf16) weights is no worse than
    twice transformers' own bf16 error against it, plus a floor of a few bf16 ulps of the logits."""
    folder, model = checkpoint(family, "bfloat16", **FAMILY_CONFIG.get(family, {}))
    source = open_checkpoint(folder)
    spec = deployment_spec(source.hf, layout_config(fit_experts(LAYOUTS["ep-with-gpu0"], family), 3, model=BATCH),
                           whole=True)
    got = engine_logits(spec, source, IDS)
    with torch.no_grad():
        theirs = model(IDS).logits
        exact = model.float()(IDS).logits
        model.to(torch.bfloat16)
    floor = 4 * 2.0**-8
    assert rel_err(got, exact) <= 2 * rel_err(theirs, exact) + floor, (rel_err(got, exact), rel_err(theirs, exact))


def test_ranks_read_only_their_slices(checkpoint, layout_config):
    folder, _ = checkpoint("mixtral")
    source = open_checkpoint(folder)
    spec = deployment_spec(source.hf, layout_config(LAYOUTS["tp-even"], 2, model=BATCH), whole=True)
    reads = {r: rank_read_bytes(spec, source, r) for r in range(3)}
    h, f, e, v, layers, q, kv = 22, 13, 5, 37, 3, 22, 2  # 11 heads x 2, 1 kv head x 2
    per_layer_attn = (h + h * q + 2 * h * kv + q * h + h + h * e) * 4  # norms, q, k, v, o, router
    assert reads[0] == (v * h + h + h * v) * 4 + layers * per_layer_attn  # embed, norm, head + layers
    shard = [6, 7]  # F 13 split at round(6.5) = 6 (ffn_shards rounds half to even)
    for r, cols in zip((1, 2), shard):
        assert reads[r] == layers * e * 3 * h * cols * 4


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_run_whole_model_on_gloo(checkpoint, layout_config, tmp_path, family):
    folder, model = checkpoint(family, sharded=True, **FAMILY_CONFIG.get(family, {}))
    out, logits = run_cli_json(folder, layout_config(LAYOUTS["tp-uneven-out2"], 3, model=BATCH), IDS, tmp_path)
    assert "all 3 layers" in out["weights"]["source"]
    with torch.no_grad():
        ref = model(IDS).logits
    assert rel_err(logits, ref) <= 1e-5
