"""Host syncs on the GPU (CUDA only): the sized sends' row counts reach the device without one, and
the whole pipeline on one GPU (local transport, expert- and tensor-parallel, the block, a whole
model, generation) syncs only on lines that say `# intended sync: why` in the source. A sync
anywhere else stalls the asynchronous issue that overlaps communication with compute; the failure
lists each such line."""

from __future__ import annotations

import linecache
import os
import threading
import traceback
import warnings

import pytest
import torch

from helpers import on_threads
from pyengine.core.spec import load_spec
from pyengine.execute.engine import Engine
from pyengine.execute.runtime_comm import _row_count
from pyengine.model.weights import make_tokens
from pyengine.transport.local import LocalTransport

pytestmark = pytest.mark.gpu
MARK = "intended sync"
SYNC_WARNING = "called a synchronizing CUDA operation"
EP = {"stages": [{"name": "embed", "gpus": [0]},
                 {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert"},
                 {"name": "output", "gpus": [0]}]}
LAYERS = {"num_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2}


@pytest.fixture
def cuda():
    torch.cuda.init()  # the module's gpu mark skips it on a machine without CUDA
    yield
    torch.cuda.set_sync_debug_mode(0)


def test_row_count_is_made_without_a_sync(cuda):
    torch.cuda.set_sync_debug_mode("error")
    count = _row_count(7, torch.device("cuda"))
    torch.cuda.set_sync_debug_mode(0)
    assert count.item() == 7 and count.dtype == torch.int64


def test_the_host_list_copy_it_replaces_does_sync(cuda):
    """The mode really catches the old construction, so the test above can fail."""
    torch.cuda.set_sync_debug_mode("error")
    with pytest.raises(RuntimeError):
        torch.tensor([7], dtype=torch.int64, device="cuda")


def sync_sites(fn) -> dict[tuple[str, int], int]:
    """(file, line) of every synchronizing CUDA call made while fn() runs, on any thread, with
    how often: the innermost frame outside torch (torch reports the warning at the Python line
    that made it, which is torch's own for a method like Stream.synchronize)."""
    torch_dir = os.path.dirname(torch.__file__)
    sites: dict[tuple[str, int], int] = {}
    lock = threading.Lock()

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return
        frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                     if not f.filename.startswith(torch_dir) and not f.filename.endswith("warnings.py"))
        with lock:
            sites[(frame.filename, frame.lineno)] = sites.get((frame.filename, frame.lineno), 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def unintended(sites: dict[tuple[str, int], int]) -> list[str]:
    return [f"{f}:{n} ({count}x): {linecache.getline(f, n).strip()}"
            for (f, n), count in sorted(sites.items()) if MARK not in linecache.getline(f, n)]


def _spec(parallel=None, **model):
    small = {"seq_len": 256, "hidden_size": 1024, "ffn_hidden_size": 2816, "vocab_size": 4000}
    spec = load_spec().replace(model={**small, **model}, comm={"timeout_s": 60})
    return spec.replace(parallel=parallel) if parallel else spec


CASES = {"tp-block": _spec(), "ep-block": _spec(EP), "ep-whole-model": _spec(EP, **LAYERS),
         "tp-whole-model": _spec(**LAYERS)}


@pytest.mark.parametrize("name", CASES)
def test_the_pipeline_syncs_only_where_it_says_so(cuda, name):
    spec = CASES[name]
    transports = LocalTransport.create(spec.world_size, "cuda", 60)
    engines = on_threads(lambda r: Engine(spec, transports[r]), timeout_s=300)
    ids = make_tokens(spec)
    on_threads(lambda r: engines[r].forward(ids), timeout_s=300)  # warm: kernels, buffers, tables
    sites = sync_sites(lambda: on_threads(lambda r: engines[r].forward(ids), timeout_s=300))
    assert not unintended(sites), "\n".join(["syncs on unmarked lines:", *unintended(sites)])
    assert sites, "no sync seen at all: the batch's end syncs, so the mode did not catch anything"
    ep_lines = [s for s in sites if s[0].endswith("expert_parallel.py")]
    assert bool(ep_lines) == spec.expert_parallel, sorted(sites)


def test_generation_syncs_only_where_it_says_so(cuda):
    spec = CASES["ep-whole-model"]
    transports = LocalTransport.create(spec.world_size, "cuda", 60)
    engines = on_threads(lambda r: Engine(spec, transports[r]), timeout_s=300)
    prompts = [torch.tensor([5, 9, 11, 3]), torch.tensor([7, 2])]
    on_threads(lambda r: engines[r].generate(prompts, 3), timeout_s=300)
    sites = sync_sites(lambda: on_threads(lambda r: engines[r].generate(prompts, 3), timeout_s=300))
    assert not unintended(sites), "\n".join(["syncs on unmarked lines:", *unintended(sites)])
    assert any(f.endswith("step_loop.py") for f, _ in sites), sorted(sites)
