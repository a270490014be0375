"""What a rank reads from a checkpoint: exactly its slices (proved by recording every read that
goes through safetensors), both Shard fields honoured, and the bytes it reports."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch

import tiny_hf
from pyengine.core.spec import DeploymentSpec
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.model.measured_routing import expert_token_counts
from pyengine.model.stages import Shard, stages_of
from pyengine.model.weights import (full_read_bytes, full_weights, rank_read_bytes, rank_weights,
                                    take)

LAYER = 1
H, F, E, V = 22, 13, 5, 37


class Recorder:
    """Wraps safetensors.safe_open: every slice or tensor read is logged as (key, index, nbytes)."""

    def __init__(self, monkeypatch):
        self.reads: list[tuple[str, tuple, int]] = []
        real, rec = safetensors.safe_open, self

        class Slice:
            def __init__(self, inner, key):
                self.inner, self.key = inner, key

            def get_shape(self):
                return self.inner.get_shape()

            def get_dtype(self):
                return self.inner.get_dtype()

            def __getitem__(self, index):
                t = self.inner[index]
                rec.reads.append((self.key, index, t.numel() * t.element_size()))
                return t

        class Opened:
            def __init__(self, path, framework, device="cpu"):
                self.cm = real(path, framework=framework, device=device)

            def __enter__(self):
                self.f = self.cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, key):
                return Slice(self.f.get_slice(key), key)

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                rec.reads.append((key, "whole", t.numel() * t.element_size()))
                return t

        monkeypatch.setattr(safetensors, "safe_open", Opened)

    def take(self) -> list[tuple[str, tuple, int]]:
        out, self.reads = self.reads, []
        return out


def tiny_spec(source, fractions=(0.3, 0.7)) -> DeploymentSpec:
    spec = deployment_spec(source.hf, None)
    return spec.replace(model={"batch_size": 1, "seq_len": 8},
                        parallel={"stages": [
                            {"name": "embed", "gpus": [0]},
                            {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2,
                             "shard_fractions": list(fractions)},
                            {"name": "output", "gpus": [0]}]})


def test_each_rank_reads_only_its_slices(checkpoint, monkeypatch):
    folder, _ = checkpoint("mixtral", sharded=True)
    src = open_checkpoint(folder, LAYER)
    spec = tiny_spec(src)
    rec = Recorder(monkeypatch)
    full = full_weights(spec, src)
    rec.take()
    cols = {r: (a, b) for r, a, b in spec.ffn_shards()}
    assert cols == {1: (0, 4), 2: (4, 13)}  # 0.3 * 13 rounds to 4: uneven
    expert_keys = {f"model.layers.{LAYER}.block_sparse_moe.experts.{e}.{p}.weight"
                   for e in range(E) for p in ("w1", "w2", "w3")}
    for rank in (0, 1, 2):
        mine = rank_weights(spec, src, rank)
        reads = rec.take()
        assert sum(n for _, _, n in reads) == rank_read_bytes(spec, src, rank)
        if rank == 0:  # embed + norm + router, final norm + head: whole, and nothing of the experts
            assert {k for k, _, _ in reads} == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                                f"model.layers.{LAYER}.post_attention_layernorm.weight",
                                                f"model.layers.{LAYER}.block_sparse_moe.gate.weight"}
            assert rank_read_bytes(spec, src, 0) == (2 * V * H + 2 * H + E * H) * 4
            continue
        a, b = cols[rank]
        assert {k for k, _, _ in reads} == expert_keys and len(reads) == 3 * E
        for key, index, nbytes in reads:  # the F slice is cut in the file, on the stored F axis
            f_axis = 1 if key.endswith("w2.weight") else 0
            assert index[f_axis] == slice(a, b) and index[1 - f_axis] == slice(None), (key, index)
            assert nbytes == (b - a) * H * 4
        for name in ("w_gate", "w_up", "w_down"):
            assert torch.equal(mine[name], take(full, name, stages_of(spec)[1].shard(rank)))
    expert_bytes = 3 * E * F * H * 4  # the two TP ranks together read each expert byte once
    assert rank_read_bytes(spec, src, 1) + rank_read_bytes(spec, src, 2) == expert_bytes
    assert full_read_bytes(spec, src) == expert_bytes + rank_read_bytes(spec, src, 0)


def test_expert_subsets_read_only_those_experts(checkpoint, monkeypatch):
    folder, _ = checkpoint("qwen3_moe")
    src = open_checkpoint(folder, LAYER)
    spec = tiny_spec(src)
    full = full_weights(spec, src)
    rec = Recorder(monkeypatch)
    shard = Shard(experts=(4, 1), f_cols=(2, 5))
    for name in ("w_gate", "w_up", "w_down"):
        got = src.weight(spec, name, shard)
        assert torch.equal(got, take(full, name, shard))
        assert got.is_contiguous()
    keys = {k for k, _, _ in rec.take()}
    assert {int(k.split(".experts.")[1].split(".")[0]) for k in keys} == {1, 4}
    assert src.read_bytes(spec, "w_down", shard) == 2 * 3 * H * 4


def test_bf16_checkpoint_reads_half_the_bytes_and_keeps_its_dtype(checkpoint):
    f32 = open_checkpoint(checkpoint("olmoe", "float32")[0], LAYER)
    b16 = open_checkpoint(checkpoint("olmoe", "bfloat16", sharded=True)[0], LAYER)
    s32, s16 = tiny_spec(f32), tiny_spec(b16)
    assert s16.model.dtype == "bfloat16"
    for r in (0, 1, 2):
        assert 2 * rank_read_bytes(s16, b16, r) == rank_read_bytes(s32, f32, r)
    assert rank_weights(s16, b16, 1)["w_up"].dtype == torch.bfloat16


def test_engine_layout_and_transposes(checkpoint):
    # the engine's [in, out] layout from HF's [out, in]: spot-check against safetensors' own load
    from safetensors.torch import load_file

    folder, _ = checkpoint("olmoe")
    src = open_checkpoint(folder, LAYER)
    spec = tiny_spec(src)
    stored = load_file(str(folder / "model.safetensors"))
    w = full_weights(spec, src)
    p = f"model.layers.{LAYER}.mlp"
    assert w["router"].shape == (H, E) and torch.equal(w["router"], stored[f"{p}.gate.weight"].T)
    assert torch.equal(w["w_gate"][3], stored[f"{p}.experts.3.gate_proj.weight"].T)
    assert torch.equal(w["w_up"][3], stored[f"{p}.experts.3.up_proj.weight"].T)
    assert torch.equal(w["w_down"][3], stored[f"{p}.experts.3.down_proj.weight"].T)
    assert torch.equal(w["out"], stored["lm_head.weight"].T)
    assert torch.equal(w["norm_in"], stored[f"model.layers.{LAYER}.post_attention_layernorm.weight"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_router_counts_match_transformers_and_read_only_the_router_part(checkpoint, monkeypatch, family):
    folder, model = checkpoint(family)
    src = open_checkpoint(folder, LAYER)
    spec = tiny_spec(src)
    ids = torch.tensor([[3, 4, 5, 9, 3, 36, 0, 7, 8, 9, 10, 4]])
    rec = Recorder(monkeypatch)
    counts = expert_token_counts(spec, src, ids)
    assert counts == tiny_hf.reference_expert_counts(model, LAYER, ids)
    assert sum(counts) == ids.numel() * spec.model.top_k and len(counts) == E
    reads = rec.take()
    assert {k.split(f"layers.{LAYER}.")[-1] for k, _, _ in reads} == {
        "model.embed_tokens.weight", "post_attention_layernorm.weight",
        f"{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.gate.weight"}
    rows = sum(n for k, _, n in reads if "embed" in k) // (H * 4)
    assert rows == len(set(ids.reshape(-1).tolist()))  # only the distinct ids' rows, once each


def test_router_counts_of_seeded_weights():
    from pyengine.core.spec import load_spec
    from pyengine.model.weights import make_tokens

    spec = load_spec(None).replace(model={"hidden_size": 32, "ffn_hidden_size": 16, "vocab_size": 50})
    ids = make_tokens(spec, 1)
    counts = expert_token_counts(spec, 1, ids)
    assert sum(counts) == spec.model.tokens * spec.model.top_k and len(counts) == spec.model.num_experts


def test_weight_refuses_a_spec_of_other_sizes(checkpoint):
    src = open_checkpoint(checkpoint("mixtral")[0], LAYER)
    spec = tiny_spec(src).replace(model={"hidden_size": 24})
    with pytest.raises(ValueError, match=r"model.hidden_size = 24: disagrees with the checkpoint \(.*hidden_size gives 22\)"):
        src.weight(spec, "embed")


def test_source_pickles_for_rank_processes(checkpoint):
    import pickle

    src = open_checkpoint(checkpoint("mixtral", sharded=True)[0], LAYER)
    again = pickle.loads(pickle.dumps(src))
    spec = tiny_spec(src)
    assert torch.equal(again.weight(spec, "w_up", Shard(f_cols=(1, 3))), src.weight(spec, "w_up", Shard(f_cols=(1, 3))))
    assert json.loads(json.dumps(again.describe()))


def test_plan_prices_the_checkpoint_router(checkpoint, capsys):
    """`plan --weights DIR --routing measured`: the router of that checkpoint on those tokens."""
    import json

    from pyengine.cli.main import main

    folder, model = checkpoint("olmoe")
    ids = torch.tensor([[3, 4, 5, 9, 3, 36, 0, 7, 8, 9, 10, 4]])
    path = folder / "ids.pt"
    torch.save(ids, path)
    assert main(["plan", "--weights", str(folder), "--layer", str(LAYER), "--routing", "measured",
                 "--tokens", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    counts = tiny_hf.reference_expert_counts(model, LAYER, ids)
    assert plan["routing"]["source"] == "measured"
    assert plan["routing"]["expert_loads"] == pytest.approx([c / sum(counts) for c in counts])
    assert main(["plan", "--hf-config", str(folder), "--routing", "measured"]) == 2
    assert "needs router weights" in capsys.readouterr().err
