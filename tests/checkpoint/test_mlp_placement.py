"""parallel.dense_mlp_placement on tiny checkpoints written by transformers: DeepSeek-V3 (a dense
first layer, two shared experts, 3 groups of 6 experts), Qwen2-MoE (a shared expert with its sigmoid
gate, a dense middle layer) and Qwen3-MoE (a dense first layer, no shared expert). The shared experts
and the dense layers' MLP on the attention GPU and split over the expert GPUs give the same logits,
both equal to transformers' `model(ids).logits` (fp32) — TP with uneven shards (the attention GPU
holding one), EP with experts on the attention GPU; threads, and gloo processes through the CLI for
one case. Each expert GPU reads only its columns of those MLPs, and the attention GPU none of them."""

from __future__ import annotations

import json

import pytest
import torch

from test_whole_model import BATCH, IDS, LAYOUTS, engine_logits, rel_err, run_cli_json
from tiny_hf import FAMILY_CONFIG, fit_experts
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.model.weights import rank_read_bytes, rank_weights

FAMILY = "deepseek_v3"
H, S, D = 22, 2 * 13, 2 * 13 + 1
"""Hidden size; shared expert: n_shared_experts (2) x moe_intermediate_size (13); dense layer:
intermediate_size (tiny_config: 2 x 13 + 1)."""


def placed(layout_config, layout: str, m: int, where: str, family: str = FAMILY) -> str:
    path = layout_config(fit_experts(LAYOUTS[layout], family), m, model=BATCH)
    with open(path) as f:
        cfg = json.load(f)
    cfg["parallel"]["dense_mlp_placement"] = where
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


CASES = [(family, layout, m) for family in (FAMILY, "qwen2_moe", "qwen3_moe")
         for layout, m in (("tp-uneven-out2", 3), ("ep-with-gpu0", 2))]


@pytest.mark.parametrize("family,layout,m", CASES, ids=[f"{f}-{lay}" for f, lay, _ in CASES])
def test_both_placements_give_transformers_logits(checkpoint, layout_config, family, layout, m):
    folder, model = checkpoint(family, **FAMILY_CONFIG.get(family, {}))
    source = open_checkpoint(folder)
    with torch.no_grad():
        ref = model(IDS).logits
    got = {}
    for where in ("attention", "experts"):
        spec = deployment_spec(source.hf, placed(layout_config, layout, m, where, family), whole=True)
        assert spec.parallel.dense_mlp_placement == where and spec.model.dense_layers
        got[where] = engine_logits(spec, source, IDS)
        assert rel_err(got[where], ref) <= 1e-5, (where, rel_err(got[where], ref))
    assert rel_err(got["experts"], got["attention"]) <= 1e-5


def test_expert_gpus_hold_and_read_only_their_columns(checkpoint, layout_config):
    """TP 0.3/0.7 over GPUs 0 (the attention GPU) and 1: S = 26 splits at round(7.8) = 8 and
    D = 27 at round(8.1) = 8; GPU 2 (the output head) holds none of it."""
    folder, _ = checkpoint(FAMILY, **FAMILY_CONFIG[FAMILY])
    source = open_checkpoint(folder)
    attn = deployment_spec(source.hf, placed(layout_config, "tp-uneven-out2", 2, "attention"), whole=True)
    spec = deployment_spec(source.hf, placed(layout_config, "tp-uneven-out2", 2, "experts"), whole=True)
    w = {r: rank_weights(spec, source, r) for r in (0, 1, 2)}
    for r, s, d in ((0, 8, 8), (1, 18, 19)):
        assert [tuple(w[r][f"layers.{l}.ws_{n}"].shape) for l in (1, 2) for n in ("gate", "up", "down")] == \
            [(H, s), (H, s), (s, H)] * 2
        assert [tuple(w[r][f"layers.0.wd_{n}"].shape) for n in ("gate", "up", "down")] == [(H, d), (H, d), (d, H)]
    assert not any(k.startswith("layers.") and (".ws_" in k or ".wd_" in k) for k in w[2])
    full = rank_weights(attn, source, 0)
    torch.testing.assert_close(torch.cat([w[0]["layers.1.ws_gate"], w[1]["layers.1.ws_gate"]], 1),
                               full["layers.1.ws_gate"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([w[0]["layers.0.wd_down"], w[1]["layers.0.wd_down"]], 0),
                               full["layers.0.wd_down"], rtol=0, atol=0)
    # fp32 bytes read: rank 0 loses its full MLPs and gains its columns (2 shared layers, 1 dense);
    # rank 1 gains its columns only
    mlp = lambda s, d: 4 * 3 * H * (2 * s + d)  # noqa: E731 (three matrices of H x cols per MLP)
    assert rank_read_bytes(attn, source, 0) - rank_read_bytes(spec, source, 0) == mlp(S, D) - mlp(8, 8)
    assert rank_read_bytes(spec, source, 1) - rank_read_bytes(attn, source, 1) == mlp(18, 19)


@pytest.mark.slow
def test_cli_run_with_mlps_on_the_expert_gpus_on_gloo(checkpoint, layout_config, tmp_path):
    folder, model = checkpoint(FAMILY, sharded=True, **FAMILY_CONFIG[FAMILY])
    _, logits = run_cli_json(folder, placed(layout_config, "ep-with-gpu0", 3, "experts"), IDS, tmp_path)
    with torch.no_grad():
        ref = model(IDS).logits
    assert rel_err(logits, ref) <= 1e-5
