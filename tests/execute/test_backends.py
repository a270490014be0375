"""A backend's traits live in one place (pyengine.execute.backends.Backend): its devices, its
memory budget, what its ranks are called, the CLI's choices. Nothing else branches on its name."""

import argparse
import pathlib
import re

import pytest

import pyengine
from pyengine.execute import memory
from pyengine.execute.backends import BACKEND_CHOICES, Backend

GB = 10**9


@pytest.fixture
def machine(monkeypatch):
    """A machine with 64 GB of available host memory and, when `gpus` is set, GPUs of 80 GB."""
    state = {"gpus": 0}
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 64 * GB)
    monkeypatch.setattr(memory, "gpu_bytes", lambda count: 80 * GB if state["gpus"] else None)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["gpus"] > 0)
    return state


def test_where_the_tensors_live(machine):
    assert Backend.NCCL.on_gpu() and not Backend.GLOO.on_gpu() and not Backend.LOCAL.on_gpu()
    machine["gpus"] = 1
    assert Backend.LOCAL.on_gpu() and not Backend.GLOO.on_gpu()


def test_what_a_rank_is_called_and_whether_the_ranks_share_a_device():
    assert [b.rank_unit for b in Backend] == ["GPU", "rank", "rank"]
    assert [b.shares_one_device for b in Backend] == [False, True, True]
    assert [b.process_per_rank for b in Backend] == [True, True, False]
    assert f"{Backend.GLOO}" == "gloo"  # messages print the name, not the enum member


def test_memory_budget_per_backend(machine):
    gloo = Backend.GLOO.memory_budget(3)  # processes share the host, each costing its interpreter
    assert (gloo.bytes, gloo.shared, gloo.per_rank_overhead) == (64 * GB, True, memory.PROCESS_BYTES)
    local = Backend.LOCAL.memory_budget(3)  # threads of this process: one interpreter in all
    assert (local.bytes, local.shared, local.per_rank_overhead) == (64 * GB - memory.PROCESS_BYTES, True, 0)
    assert Backend.NCCL.memory_budget(3) is None  # no GPU: nothing to measure
    machine["gpus"] = 1
    nccl, local = Backend.NCCL.memory_budget(3), Backend.LOCAL.memory_budget(3)
    assert (nccl.bytes, nccl.shared) == (80 * GB, False)  # each rank has its GPU to itself
    assert (local.bytes, local.shared) == (80 * GB, True)  # the virtual ranks share the one GPU


def _backend_choices(parser: argparse.ArgumentParser) -> list:
    return [a.choices for a in parser._actions if "--backend" in a.option_strings]


def test_every_cli_offers_the_same_choices():
    from pyengine.cli.main import build_parser
    from pyengine.commbench.cli import add_arguments

    sub = next(a for a in build_parser([])._actions if isinstance(a, argparse._SubParsersAction))
    found = [c for name in ("run", "generate") for c in _backend_choices(sub.choices[name])]
    bench = argparse.ArgumentParser()
    add_arguments(bench)
    found += _backend_choices(bench)
    assert found == [BACKEND_CHOICES] * 3


def test_no_module_branches_on_a_backend_name():
    root = pathlib.Path(pyengine.__file__).parent
    branch = re.compile(r"""backend(\.value)?\s*(==|!=|is|in)\s*[("'\[]""")
    found = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, found
