"""Compile check (`pyengine kernels compile`): every kernel compiled for sm_90 without a GPU.

The compiles run in worker processes without TRITON_INTERPRET (conftest sets it for this
process). Fast tests: the seed shapes and the odd test shapes in bf16/fp16/fp32 with the
configs the engine picks, plus configs that must fail. Slow: every autotune candidate,
which also checks the run-time shared-memory estimate against the compiled figures.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import triton

import pyengine.kernels
from pyengine.kernels import compile_check, compile_jobs, smem, tuning
from pyengine.kernels.compile_jobs import Shapes, build_jobs
from pyengine.kernels.compile_jobs_decode import DecodeShapes
from pyengine.kernels.compile_target import stand_in_driver
from pyengine.kernels.decode_configs import DECODE_TOKENS, decode_config

# Compiling is slow on a loaded 2-core machine (the fast_rows fixture: ~50-90 s cold).
pytestmark = pytest.mark.timeout(900)

ARCH = 90
# The decode path at the seed model's attention (the packaged seed has none: the check uses
# seed_model_3gpu's): 32 heads, 8 kv heads, d 128, 16-key blocks, buckets of 1..256 rows.
SEED_DECODE = DecodeShapes(hidden=4096, heads=32, kv_heads=8, head_dim=128, block_size=16,
                           max_positions=32768, E=8, top_k=2)
SEED = Shapes(E=8, H=4096, top_k=2, ffn_shards=(7168, 7168), tokens=(256,) * 4, num_partials=1,
              decode_tokens=DECODE_TOKENS, decode=SEED_DECODE)
# The decode path at odd shapes: d=80 (padded to 128), GQA 2, 32-key blocks, the full-projection
# norm, DeepSeek-V3's router (E=256, k=8, 8 groups keep 4), 1 and 3 rows.
ODD_DECODE = DecodeShapes(hidden=40, heads=4, kv_heads=2, head_dim=80, block_size=32, max_positions=300,
                          E=256, top_k=8, qk_norm="full", router_groups=(8, 4), rows=(1, 3))
ODD = [  # the shapes tests/kernels runs in the interpreter: non-multiples of 16, k=3, T=1
    Shapes(E=3, H=40, top_k=2, ffn_shards=(29,), tokens=(7,), num_partials=2, decode=ODD_DECODE),
    Shapes(E=5, H=24, top_k=3, ffn_shards=(13, 16), tokens=(37,), num_partials=4,  # gpt-oss's experts
           expert_bias=True, clamped=True),
    Shapes(E=1, H=17, top_k=1, ffn_shards=(17,), tokens=(1,), num_partials=3),
]
DTYPES = ["bf16", "fp16", "fp32"]
TOO_BIG = "BLOCK_M=128,BLOCK_N=256,BLOCK_K=128,GROUP_M=8,num_warps=8,num_stages=4"  # ~641 KB
SPILLS = "BLOCK_M=128,BLOCK_N=256,BLOCK_K=32,GROUP_M=8,num_warps=4,num_stages=2"  # 2 x 256 acc regs
GEMMS = {"_moe_column_kernel", "_moe_row_kernel"}
NO_DOT = {"_residual_rmsnorm_kernel", "_moe_align_kernel", "_moe_sum_pairs_kernel",
          "_decode_attention_combine_kernel", "_qk_rope_cache_kernel", "_router_topk_kernel",
          "_mla_rope_cache_kernel"}
ROW_KEYS = {"kernel", "variant", "dtype", "config", "source", "shapes", "shared_bytes", "registers",
            "spill_bytes", "mma", "tmem_cols", "estimate_bytes", "pruned", "gates", "ok", "reason"}


def pinned_jobs(config: str) -> list:
    """The seed's kernels in bf16 as the engine runs them with the column GEMM's `config`
    pinned (what the CLI test below compiles: it then finds them in Triton's cache)."""
    with mock.patch.dict(os.environ, {"PYENGINE_MOE_COLUMN_CONFIG": config}):
        return build_jobs(dataclasses.replace(SEED, decode_tokens=(), decode=None), ["bf16"], ARCH)


@pytest.fixture(scope="module")
def fast_rows():
    """One compile run (two workers) for every fast test: defaults, odd shapes, bad configs."""
    jobs = build_jobs(SEED, ["bf16"], ARCH)  # decode tiles: the model dtype only (compile time)
    jobs += build_jobs(dataclasses.replace(SEED, decode_tokens=(), decode=None), ["fp16", "fp32"], ARCH)
    for shapes in ODD:
        jobs += build_jobs(shapes, DTYPES, ARCH)
    bad = pinned_jobs(TOO_BIG) + pinned_jobs(SPILLS)
    rows = compile_check.run_jobs(jobs + bad, ARCH)
    return rows[:len(jobs)], rows[len(jobs):]


def test_engine_configs_compile_for_sm90(fast_rows):
    rows, _ = fast_rows
    failed = compile_check.gate_failures(rows)
    assert not failed, [(r["kernel"], r["dtype"], r["config"], r["reason"]) for r in failed]
    assert {r["kernel"] for r in rows} == set(compile_jobs.KERNELS)
    for r in rows:
        assert ROW_KEYS <= set(r) and 0 <= r["shared_bytes"] <= smem.SHARED_LIMIT[ARCH]
        assert 0 < r["registers"] <= 255
        if r["kernel"] in NO_DOT:
            assert r["mma"] == "none", r
        if r["kernel"] not in GEMMS:
            continue
        if r["dtype"] == "fp32":  # input_precision="ieee": FMA, no tensor cores
            assert r["mma"] == "none"
        else:  # wgmma needs >= 64 rows per warpgroup; smaller tiles use mma.sync
            assert r["mma"] == ("wgmma" if r["config"]["BLOCK_M"] >= 64 else "mma.sync")


def test_biased_clamped_expert_variants_compile(fast_rows):
    """gpt-oss's expert GEMMs (biases, clamped SwiGLU) are compiled as launched, in every dtype."""
    rows, _ = fast_rows
    got = {(r["kernel"], r["variant"], r["dtype"]) for r in rows if "T=37" in " ".join(r["shapes"])}
    want = {(k, v, d) for d in DTYPES for k, v in [("_moe_column_kernel", "swiglu,clamped,bias"),
                                                    ("_moe_row_kernel", "deterministic,bias"),
                                                    ("_moe_row_kernel", "atomic,bias")]}
    assert want <= got, want - got


def test_seed_defaults_and_estimate(fast_rows):
    rows, _ = fast_rows
    seed = [r for r in rows if r["dtype"] == "bf16" and "T=256 F_r=7168" in r["shapes"]]
    assert {(r["kernel"], r["variant"]) for r in seed} == {
        ("_moe_column_kernel", "swiglu"), ("_moe_row_kernel", "deterministic"), ("_moe_row_kernel", "atomic")}
    for r in seed:  # T=256 > 64 tokens: the mid-size default tiles
        assert r["source"] == "default"
        op = {"_moe_column_kernel": "column", "_moe_row_kernel": "row"}[r["kernel"]]
        assert r["config"] == tuning.config_to_dict(tuning.GPU_DEFAULT[op])
    for r in seed:  # aligned shapes: the run-time estimate is the compiled figure (+ barriers)
        assert r["shared_bytes"] <= r["estimate_bytes"] <= r["shared_bytes"] + 256, r
    for r in rows:  # unaligned ones stage loads in registers: the estimate is an upper bound
        if r["estimate_bytes"] is not None:
            assert r["shared_bytes"] <= r["estimate_bytes"], r


def test_decode_tiles_compile(fast_rows):
    """The seed's decode steps compile with decode_config's tiles, fit and do not spill."""
    rows, _ = fast_rows
    ops = {"_moe_column_kernel": ("column", 7168, 4096), "_moe_row_kernel": ("row", 4096, 7168)}
    for t in DECODE_TOKENS:
        got = [r for r in rows if f"T={t} F_r=7168" in r["shapes"] and r["kernel"] in ops]
        assert len(got) == 3, got  # column + the row kernel's two variants
        for r in got:
            op, N, K = ops[r["kernel"]]
            want = decode_config(op, num_tokens=t, top_k=2, E=8, N=N, K=K, dtype=torch.bfloat16, sms=132)
            assert r["config"] == tuning.config_to_dict(want) and r["source"] == "default"
            assert r["ok"] and r["spill_bytes"] == 0, r


def test_decode_path_compiles_for_every_bucket(fast_rows):
    """The decode-path kernels at the seed model's attention, each row bucket 1..256 (bf16), and
    at the odd shapes in every dtype: they compile, fit, do not spill in bf16/fp16, and the
    attention's dots run on tensor cores in bf16 (16-row head groups: mma.sync)."""
    rows, _ = fast_rows
    decode = {"_decode_attention_split_kernel", "_decode_attention_combine_kernel",
              "_qk_rope_cache_kernel", "_router_topk_kernel"}
    seed = [r for r in rows if r["kernel"] in decode and r["dtype"] == "bf16"]
    for n in SEED_DECODE.rows:
        assert {r["kernel"] for r in seed if any(s.startswith(f"rows={n} ") or s == f"rows={n}"
                                                 for s in r["shapes"])} == decode, n
    for r in (r for r in rows if r["kernel"] in decode):
        assert r["ok"], r
        if r["kernel"] == "_decode_attention_split_kernel":
            assert r["mma"] == ("none" if r["dtype"] == "fp32" else "mma.sync"), r
    kinds = {(r["variant"], r["dtype"]) for r in rows if r["kernel"] == "_router_topk_kernel"}
    assert ("sigmoid_grouped,groups=8/4", "fp16") in kinds and ("softmax,groups=1/1", "bf16") in kinds


def test_too_much_shared_memory_fails(fast_rows):
    _, bad = fast_rows
    (row,) = [r for r in bad if r["config"] == tuning.config_to_dict(tuning.parse_config(TOO_BIG))]
    assert not row["ok"] and row["gates"] and row["source"] == "pinned"
    assert [r["ok"] for r in bad if r["kernel"] == "_moe_row_kernel"] == [True] * 4  # 2 pins x 2 variants
    assert f"> sm_90 limit {smem.SHARED_LIMIT[90]} B" in row["reason"]
    assert row["shared_bytes"] > smem.SHARED_LIMIT[90]


def test_bf16_spill_fails(fast_rows):
    _, bad = fast_rows
    (row,) = [r for r in bad if r["config"] == tuning.config_to_dict(tuning.parse_config(SPILLS))]
    assert row["shared_bytes"] <= smem.SHARED_LIMIT[90] and row["spill_bytes"] > 0
    assert not row["ok"] and "B/thread in bf16" in row["reason"]


def test_fp32_spills_are_notes_not_failures():
    row = dict(shared_bytes=1000, spill_bytes=36, dtype="fp32", tmem_cols=0, estimate_bytes=1000,
               pruned=False)
    problems, notes = compile_check.judge(row, ARCH)
    assert problems == [] and notes == ["spills 36 B/thread (allowed in fp32)"]
    problems, _ = compile_check.judge({**row, "dtype": "fp16"}, ARCH)
    assert problems == ["spills 36 B/thread in fp16"]


def test_estimate_disagreeing_with_compile_fails():
    row = dict(shared_bytes=240000, spill_bytes=0, dtype="bf16", tmem_cols=0, estimate_bytes=200000,
               pruned=False)
    problems, _ = compile_check.judge(row, ARCH)
    assert any("disagree" in p for p in problems) and any("> sm_90 limit" in p for p in problems)


# ---- the command ---------------------------------------------------------------------------
def kernels_compile(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", "kernels", "compile", *args],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def test_cli_json_lists_every_kernel(fast_rows):  # compiles hit Triton's cache from fast_rows
    r = kernels_compile("--arch", "90", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"commit", "date", "triton", "arch", "shared_limit_bytes", "gpu"} <= set(out["meta"])
    assert out["meta"]["shared_limit_bytes"] == 232448
    assert {row["kernel"] for row in out["rows"]} == set(compile_jobs.KERNELS)
    assert all(ROW_KEYS <= set(row) and row["ok"] for row in out["rows"])


def test_cli_exit_1_on_a_config_that_does_not_fit(fast_rows):
    r = kernels_compile("--arch", "90", env={"PYENGINE_MOE_COLUMN_CONFIG": TOO_BIG})
    assert r.returncode == 1, r.stdout + r.stderr
    launches = len({256, *DECODE_TOKENS})  # the pin applies at every token count, decode too
    assert f"{launches} failing" in r.stdout and "128x256x128" in r.stdout


def test_cli_unknown_arch_exit_2():
    r = kernels_compile("--arch", "75")
    assert r.returncode == 2 and "--arch 75: must be one of" in r.stderr


def test_cli_bad_pin_exit_2():
    r = kernels_compile("--arch", "90", env={"PYENGINE_MOE_CONFIG": "BLOCK_M=48"})
    assert r.returncode == 2 and "'BLOCK_M=48': keys" in r.stderr, r.stderr


def test_shapes_from_spec():
    from pyengine.cli.kernels import shapes_from_spec
    from pyengine.core.spec import load_spec

    assert shapes_from_spec(load_spec()) == SEED
    tiny = load_spec(os.path.join(os.path.dirname(__file__), "..", "..", "pyengine", "configs", "tiny_cpu.json"))
    # F=40 split 0.4/0.6, 48 tokens in 3 micro-batches, "partials": the output stage sums 2
    assert shapes_from_spec(tiny) == Shapes(E=5, H=48, top_k=2, ffn_shards=(16, 24), tokens=(16, 16, 16),
                                            num_partials=2, decode_tokens=DECODE_TOKENS, decode=SEED_DECODE)
    ep = load_spec(os.path.join(os.path.dirname(__file__), "..", "..", "pyengine", "configs", "seed_ep_3gpu.json"))
    # experts 2/3/3 of 8, top-2, 256 tokens a micro-batch: 128 and 192 (token, expert) rows per
    # GEMM launch (top-1 form, whole F); the output stage's norm still sees all 256 tokens
    assert shapes_from_spec(ep) == Shapes(E=3, H=4096, top_k=1, ffn_shards=(14336,), tokens=(128, 192),
                                          num_partials=1, norm_tokens=(256, 256, 256, 256),
                                          decode=SEED_DECODE)
    model = shapes_from_spec(load_spec("seed_model_3gpu"))  # a model with attention: its own
    assert model.decode == SEED_DECODE


def test_worker_failure_is_raised():
    job = build_jobs(ODD[2], ["fp32"], ARCH)[0]
    job.kernel = "_no_such_kernel"
    with pytest.raises(RuntimeError, match=r"(?s)compile worker exited 1: .*kernel='_no_such_kernel': must be one of"):
        compile_check.run_jobs([job], ARCH, workers=1)


# ---- pieces that need no compiler ----------------------------------------------------------
def test_stand_in_driver_is_removed_even_on_error():
    from triton.runtime.driver import driver

    before = driver._active
    with pytest.raises(ValueError, match="inside"):
        with stand_in_driver(100) as d:
            assert driver.active is d and d.get_current_target().arch == 100
            assert isinstance(d.get_current_device(), str)  # never a real device index
            with pytest.raises(AttributeError, match=r"stand-in driver for sm_100: 'utils'"):
                d.utils
            raise ValueError("inside")
    assert driver._active is before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter path")
def test_interpreted_kernels_are_refused_in_process():
    from pyengine.kernels.compile_target import compile_kernel
    from pyengine.kernels.moe_row_down import _moe_row_kernel

    with pytest.raises(TypeError, match="not a JITFunction"):
        compile_kernel(_moe_row_kernel, [], {}, ARCH)


def test_every_jitted_function_is_checked():
    """A new @triton.jit in pyengine.kernels must be added to compile_jobs.KERNELS (or be a
    helper compiled inline with one)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = set()
    for info in pkgutil.iter_modules(pyengine.kernels.__path__):
        mod = importlib.import_module(f"pyengine.kernels.{info.name}")
        found |= {name for name, obj in vars(mod).items()
                  if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == mod.__name__}
    assert found == set(compile_jobs.KERNELS) | compile_jobs.INLINE_HELPERS


def test_shared_limit_table():
    assert smem.shared_limit(90) == 232448 == smem.shared_limit(100)  # 227 KB
    with pytest.raises(ValueError, match=r"arch=75: no shared-memory limit known"):
        smem.shared_limit(75)


def test_candidates_pruned_by_shared_memory():
    col = tuning.GPU_CONFIGS["column"]
    assert tuning.gpu_candidates("column", 90, torch.bfloat16) == col  # all fit in bf16
    fp32 = tuning.gpu_candidates("column", 90, torch.float32)
    dropped = [tuning.config_to_dict(c) for c in col if c not in fp32]
    assert dropped == [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)]
    assert len(tuning.gpu_candidates("column", 120, torch.bfloat16)) < len(col)  # 99 KB parts
    huge = tuning.parse_config(TOO_BIG)
    assert tuning.prune_configs("column", [huge], 128, torch.bfloat16, 90) == []
    assert tuning.prune_configs("column", [huge], 128, torch.bfloat16, None) == [huge]  # CPU


def test_autotune_prune_uses_the_device_arch(monkeypatch):
    from pyengine.kernels import moe_column_swiglu as col

    monkeypatch.setattr(tuning, "launch_arch", lambda t: 90)
    u = torch.empty(1, 1, dtype=torch.float32)
    kept = col._prune(tuning.GPU_CONFIGS["column"], {"u_ptr": u}, ALIGN_M=128)
    assert kept == tuning.gpu_candidates("column", 90, torch.float32)


def test_pick_config_for_a_named_gpu(tmp_path, monkeypatch):
    for var in ("PYENGINE_MOE_CONFIG", "PYENGINE_MOE_COLUMN_CONFIG", "PYENGINE_MOE_ROW_CONFIG",
                "PYENGINE_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)
    shape = dict(gpu="NVIDIA H100 80GB HBM3", dtype=torch.bfloat16, E=8, H=4096, F=7168)
    decode = tuning.decode_configs.decode_config("row", num_tokens=32, top_k=1, E=8, N=4096,
                                                 K=7168, dtype=torch.bfloat16, sms=132)
    got = tuning.pick_config("row", **shape, num_tokens=32, config_dir=tmp_path)
    assert got.source == "default" and tuning.config_to_dict(got.config) == tuning.config_to_dict(decode)
    path = tuning.config_path("row", shape["gpu"], torch.bfloat16, 8, 4096, 7168, tmp_path)
    path.write_text(json.dumps({"meta": {}, "configs": {"256": tuning.config_to_dict(huge := tuning.parse_config(TOO_BIG))}}))
    got = tuning.pick_config("row", **shape, num_tokens=256, config_dir=tmp_path)
    assert got.source == "tuned" and got.config.kwargs == huge.kwargs
    monkeypatch.setenv("PYENGINE_AUTOTUNE", "1")
    assert tuning.pick_config("row", **shape, num_tokens=256) == (None, "autotune")


# ---- slow: every candidate -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~2.5 min cold on 2 cores for sm_90 (108 compiles)
@pytest.mark.parametrize("arch,dtypes", [(90, DTYPES), (100, ["bf16"])])
def test_every_candidate_compiles_and_matches_the_estimate(arch, dtypes):
    if arch != 90 and compile_check.probe_arch(arch) is not None:
        pytest.skip(f"Triton {triton.__version__} cannot compile for sm_{arch}")
    prefill = dataclasses.replace(SEED, decode_tokens=())  # decode tiles: test_decode_tiles_compile
    rows = compile_check.run_jobs(build_jobs(prefill, dtypes, arch, all_configs=True), arch)
    assert all(r["shared_bytes"] is not None for r in rows), [r["reason"] for r in rows if not r["shared_bytes"]]
    engine = [r for r in rows if r["source"] != "candidate"]
    assert not compile_check.gate_failures(engine), compile_check.gate_failures(engine)
    cands = [r for r in rows if r["source"] == "candidate" and r["estimate_bytes"] is not None]
    assert len(cands) == len(dtypes) * 30  # 10 column + 2 x 10 row (both ATOMIC variants)
    for r in cands:  # the run-time rule agrees with the compiler on every candidate
        assert r["shared_bytes"] <= r["estimate_bytes"] <= r["shared_bytes"] + 256, r
        assert r["pruned"] == (r["shared_bytes"] > smem.SHARED_LIMIT[arch]), r
    if arch == 90:  # the list's target: every candidate that can run passes
        failed = compile_check.gate_failures(rows)
        assert not failed, [(r["kernel"], r["dtype"], r["config"], r["reason"]) for r in failed]
        pruned = [(r["kernel"], r["dtype"], r["config"]["BLOCK_M"]) for r in cands if r["pruned"]]
        assert pruned == [("_moe_column_kernel", "fp32", 32)]  # 32x64x128 s4: 241 KB
    # sm_100: Hopper candidates that spill there are reported, not asserted (Triton 3.6
    # spills 28 B/thread in column 32x128x64; 3.9 none).


def test_the_candidate_sweep_is_not_repeated_at_decode_counts():
    """--all-configs sweeps the candidate list at the prefill counts; decode counts add only their
    own tiles (a sweep per decode count multiplied the compile jobs sixfold)."""
    prefill = dataclasses.replace(SEED, decode_tokens=())
    count = lambda jobs: sum(j.source == "candidate" for j in jobs)
    assert count(build_jobs(SEED, ["bf16"], ARCH, all_configs=True)) == count(
        build_jobs(prefill, ["bf16"], ARCH, all_configs=True))
