"""Checkpoint runs against transformers: the engine's logits for decoder layer N of a tiny random
Mixtral / Qwen3-MoE / OLMoE checkpoint (float32 and bfloat16, one file and sharded) against
transformers' own embedding, RMSNorms, sparse MoE block and lm_head composed as the block is.

The in-process cases run the engine over the local transport (3 CPU threads); the CLI cases run
`pyengine run --weights` as a user does (3 gloo processes) and compare its dumped logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_hf
from pyengine.execute.engine import Engine
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.model.weights import rank_read_bytes
from pyengine.transport.local import LocalTransport
from helpers import on_threads

LAYER = 1  # the middle of 3 layers: a loader reading the wrong layer gets other random weights
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
"""max |engine - transformers| / max |transformers|: fp32 differs only in summation order; bf16
also in where each implementation rounds (transformers rounds the norm before its gain, the
routing weight to bf16 for Qwen3/OLMoE, and accumulates experts in bf16; the engine in fp32)."""

LAYOUTS = {
    "uneven-tp": ({"stages": [{"name": "embed", "gpus": [0]},
                              {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2,
                               "shard_fractions": [0.3, 0.7]},
                              {"name": "output", "gpus": [0]}]}, "partials"),
    "output-on-gpu2": ({"stages": [{"name": "embed", "gpus": [0]},
                                   {"name": "experts", "gpus": [0, 1], "tensor_parallel_size": 2,
                                    "shard_fractions": [0.6, 0.4]},
                                   {"name": "output", "gpus": [2]}]}, "all_reduce"),
}


def layout_of(name: str) -> dict:
    """layout_config's arguments for a layout: its stages and boundary, m 3, a 2 x 11 batch."""
    parallel, boundary = LAYOUTS[name]
    return {"stages": parallel["stages"], "m": 3, "boundary": boundary, "model": {"batch_size": 2, "seq_len": 11}}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def run_engine(spec, source, ids) -> torch.Tensor:
    """Logits from 3 virtual ranks (threads) over the local transport, each loading its slices."""
    transports = LocalTransport.create(3, "cpu", 30)
    return on_threads(lambda r: Engine(spec, transports[r], source=source).forward(ids), timeout_s=120)[spec.stage("output").gpus[0]]


BLOCK_CONFIG = {"qwen3_moe": dict(norm_topk_prob=True),
                "deepseek_v3": dict(experts=6, n_shared_experts=0)}  # --layer runs a block without shared experts
CASES = [(fam, dtype, sharded, layout)
         for fam in ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
         for dtype, sharded in (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True))
         for layout in LAYOUTS]


@pytest.mark.parametrize("family,dtype,sharded,layout", CASES,
                         ids=[f"{f}-{d}-{'sharded' if s else 'single'}-{lay}" for f, d, s, lay in CASES])
def test_engine_matches_transformers(checkpoint, layout_config, family, dtype, sharded, layout):
    folder, model = checkpoint(family, dtype, sharded, **BLOCK_CONFIG.get(family, {}))
    source = open_checkpoint(folder, LAYER)
    spec = deployment_spec(source.hf, layout_config(**layout_of(layout)))
    assert spec.model.dtype == dtype and spec.model.renormalize == (family != "olmoe")
    ids = torch.randint(0, spec.model.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    got = run_engine(spec, source, ids)
    ref = tiny_hf.reference_logits(model, LAYER, ids)
    assert got.shape == ref.shape == (2, 11, spec.model.vocab_size)
    assert rel_err(got, ref) <= TOLERANCE[dtype], rel_err(got, ref)


def test_tied_embeddings_use_the_embedding_as_the_head(checkpoint, layout_config):
    folder, model = checkpoint("olmoe", tie=True)
    source = open_checkpoint(folder, LAYER)
    assert source.names["out"] == "model.embed_tokens.weight"
    spec = deployment_spec(source.hf, layout_config(**layout_of("uneven-tp")))
    ids = torch.arange(22).reshape(2, 11) % spec.model.vocab_size
    assert rel_err(run_engine(spec, source, ids), tiny_hf.reference_logits(model, LAYER, ids)) <= 1e-5


def test_a_stored_head_is_used_even_when_the_config_says_tied(checkpoint, layout_config, tmp_path):
    """tie_word_embeddings: true beside a stored lm_head.weight that differs from the embedding:
    transformers keeps the stored head (it warns), so the engine must too."""
    import json
    import shutil

    folder, model = checkpoint("mixtral")
    tied = shutil.copytree(folder, tmp_path / "tied")
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    source = open_checkpoint(str(tied), LAYER)
    assert source.names["out"] == "lm_head.weight"
    spec = deployment_spec(source.hf, layout_config(**layout_of("uneven-tp")))
    ids = torch.arange(22).reshape(2, 11) % spec.model.vocab_size
    assert rel_err(run_engine(spec, source, ids), tiny_hf.reference_logits(model, LAYER, ids)) <= 1e-5


def test_a_different_layer_gives_different_logits(checkpoint):
    # guards the comparison itself: layers differ, so reading the wrong one cannot pass
    folder, model = checkpoint("mixtral")
    ids = torch.arange(22).reshape(2, 11) % 37
    assert rel_err(tiny_hf.reference_logits(model, 0, ids), tiny_hf.reference_logits(model, LAYER, ids)) > 1e-2


# ---- the command line, as a user runs it ------------------------------------------------------

def pyengine(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,layout", [("mixtral", "float32", "uneven-tp"),
                                                 ("olmoe", "bfloat16", "output-on-gpu2")])
def test_cli_run_weights_matches_transformers(checkpoint, layout_config, tmp_path, family, dtype, layout):
    folder, model = checkpoint(family, dtype, sharded=True)
    ids = np.random.default_rng(3).integers(0, 37, size=(3, 7))
    np.save(tmp_path / "ids.npy", ids)
    cfg = layout_config(**layout_of(layout))
    r = pyengine("run", "--weights", str(folder), "--layer", str(LAYER), "--config", cfg,
                 "--tokens", str(tmp_path / "ids.npy"), "--iters", "1", "--warmup", "0", "--no-baselines",
                 "--json", "--dump", str(tmp_path / "dump"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["scaled"] == "" and out["check"]["ok"] and out["tokens_per_batch"] == 21
    logits = torch.load(tmp_path / "dump" / "logits.pt")
    assert torch.equal(torch.load(tmp_path / "dump" / "tokens.pt"), torch.from_numpy(ids))
    assert rel_err(logits, tiny_hf.reference_logits(model, LAYER, torch.from_numpy(ids))) <= TOLERANCE[dtype]
    source = open_checkpoint(folder, LAYER)
    spec = deployment_spec(source.hf, cfg).replace(model={"batch_size": 3, "seq_len": 7})
    reads = out["weights"]["read_bytes_per_rank"]
    assert reads == {str(r): rank_read_bytes(spec, source, r) for r in range(3)}
    assert all(b > 0 for b in reads.values()) and out["weights"]["source"].startswith("checkpoint ")
