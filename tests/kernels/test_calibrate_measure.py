"""`pyengine calibrate`'s measuring code, run on CPU at tiny sizes (the engine's kernels under the
Triton interpreter, set up by this folder's conftest): every call is timed and comes back with the kernels the planner prices."""

import torch

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.execute.calibrate import Sizes, measure_compute
from pyengine.model.costs import KernelKind

TINY = Sizes(copy_bytes=(1 << 16, 1 << 17), launches=5, dense_rows=(4, 8), dense_nk=32,
             grouped_tokens=(3, 8), iters=2, warmup=1)


def test_every_measurement_is_timed_and_priced():
    spec = load_spec(TINY_CONFIG)  # fp32, H 48, experts 5 top-2, F shard 16 on GPU 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    got = measure_compute(spec, device, TINY)
    assert [b for b, _ in got.copy] == [2 * (1 << 16), 2 * (1 << 17)] and all(s > 0 for _, s in got.copy)
    assert got.launch_s > 0
    assert [ks[0].rows for ks, _ in got.dense] == [4, 8]
    assert got.dense[0][0][0].flops == 2 * 4 * 32 * 32 and all(s > 0 for _, s in got.dense)
    for (kernels, seconds), t in zip(got.grouped, (3, 8)):
        assert seconds > 0 and [k.kind for k in kernels] == [KernelKind.GROUPED] * 2
        assert kernels[0].flops == 4 * t * 2 * 48 * 16  # gate + up over F_r = 16 columns of 40 (0.4)
