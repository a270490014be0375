"""GPU: the whole pipeline on one GPU through the local transport (3 virtual ranks, one stream
set each), bf16, Triton kernels in stage 1/2, against the single-device reference."""

from __future__ import annotations

import numpy as np
import pytest

from pyengine.core.spec import load_spec
from pyengine.execute.check import TOLERANCES
from pyengine.execute.launch import Backend, bind, run_ranks
from pyengine.execute.measure import RunOptions, measure_rank, variants
from pyengine.report.run_summary import summarize

pytestmark = pytest.mark.gpu


def _launch(spec, opts):
    groups = spec.comm_groups()
    return run_ranks(bind(measure_rank, spec, opts), spec.world_size, backend=Backend.LOCAL,
                     groups=groups, timeout_s=spec.comm.timeout_s, job_timeout_s=600)


def _spec(**model):
    base = load_spec()
    small = {"seq_len": 512, "hidden_size": 1024, "ffn_hidden_size": 2816, "vocab_size": 4000}
    return base.replace(model={**small, **model}, comm={"timeout_s": 60})


@pytest.mark.parametrize("boundary", ["all_reduce", "partials", "reduce_scatter"])
def test_local_transport_bf16_matches_reference(boundary):
    spec = _spec().replace(comm={"boundary": boundary})
    results = _launch(spec, RunOptions(iters=2, warmup=1, baselines=False))
    out = results[spec.stage("output").gpus[0]]
    got, ref = out.logits, out.reference_logits
    atol, rtol = TOLERANCES["bfloat16"]
    wrong = np.count_nonzero(np.abs(got - ref) > atol + rtol * np.abs(ref))
    assert wrong <= got.size * 1e-4, f"{wrong} of {got.size} logits off (max {np.abs(got - ref).max():.3g})"


def test_overlap_is_visible_in_the_measured_timeline():
    spec = _spec(seq_len=1024)
    opts = RunOptions(iters=3, warmup=2, baselines=True)
    results = _launch(spec, opts)
    summary = summarize(spec, variants(spec, True), results, backend=Backend.LOCAL)
    tl = summary.variants["pipeline"].timeline
    # Some comm span of micro-batch i runs while a compute span of another micro-batch runs
    # on the same rank: the receive/reduction is hidden behind compute.
    overlapped = [
        (c.name, k.name) for c in tl.spans if c.lane == "comm"
        for k in tl.spans if k.lane == "compute" and k.rank == c.rank
        and k.micro_batch != c.micro_batch and k.start_s < c.end_s and c.start_s < k.end_s]
    assert overlapped, "no comm span overlaps compute of another micro-batch"
    assert summary.variants["pipeline"].measured["hidden_comm_fraction"] > \
        summary.variants["no_overlap"].measured["hidden_comm_fraction"]
    assert summary.check.ok, summary.check
