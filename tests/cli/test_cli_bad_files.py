"""Hostile files and environments, refused in one line naming the flag (or variable) and the
value, exit 2, before any rank starts: empty, garbage, looping, sparse and quantized token files."""

from __future__ import annotations

import os

import pytest

from helpers import TINY_CONFIG, packaged_config
from pyengine.cli.main import main

MODEL = packaged_config("seed_model_3gpu.json")
COMMANDS = {"run": ("run", "--config", TINY_CONFIG),
            "generate": ("generate", "--config", MODEL, "--max-new-tokens", "2")}


@pytest.fixture
def no_ranks(monkeypatch):
    """Any attempt to start ranks fails the test: refusals must come first."""
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("ranks were started"))


def refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and cap.out == "" and "Traceback" not in cap.err, cap.err
    return lines[0]


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(b"not a torch file at all " * 8)


def _loop(path):
    os.symlink(path.name, path)  # a link to itself


def _folder(path):
    path.mkdir()


def _sparse(path):
    import torch

    torch.save(torch.tensor([[1, 0, 3]]).to_sparse(), path)


def _sparse_csr(path):
    import warnings

    import torch

    with warnings.catch_warnings():  # "support is in beta": a file may still hold one
        warnings.simplefilter("ignore")
        torch.save(torch.tensor([[1, 0, 3]]).to_sparse_csr(), path)


def _quantized(path):
    import warnings

    import torch

    with warnings.catch_warnings():  # quantized tensors are deprecated: a file may still hold one
        warnings.simplefilter("ignore")
        torch.save(torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 1.0, 0, torch.qint8), path)


def _nested(path):
    import warnings

    import torch

    with warnings.catch_warnings():  # "prototype stage": a file may still hold one
        warnings.simplefilter("ignore")
        torch.save(torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])]), path)


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("name,make,words", [
    ("ids.pt", _nested, "holds a nested tensor: token ids must be a dense tensor"),
    ("ids.pt", _sparse, "holds a sparse_coo tensor: token ids must be a dense tensor"),
    ("ids.pt", _sparse_csr, "holds a sparse_csr tensor: token ids must be a dense tensor"),
    ("ids.pt", _quantized, "holds torch.qint8: token ids must be integers"),
    ("ids.npy", _empty, "is empty (0 bytes)"),
    ("ids.pt", _empty, "is empty (0 bytes)"),
    ("ids.pt", _garbage, "cannot be read as a torch file"),
    ("ids.npy", _garbage, "cannot be read as a .npy array"),
    ("ids.pt", _loop, "is a symlink loop"),
    ("ids.npy", _folder, "is a folder"),
])
def test_bad_token_files_are_one_line(tmp_path, capsys, no_ranks, command, name, make, words):
    path = tmp_path / name
    make(path)
    line = refused(capsys, *COMMANDS[command], "--tokens", str(path))
    assert "--tokens" in line and str(path) in line and words in line, line
    assert "weights_only" not in line  # never advise loading a file's arbitrary code


def test_a_list_holding_a_sparse_prompt_is_one_line(tmp_path, capsys, no_ranks):
    import torch

    torch.save([torch.tensor([1, 2]), torch.tensor([1, 0, 3]).to_sparse()], tmp_path / "p.pt")
    line = refused(capsys, *COMMANDS["generate"], "--tokens", str(tmp_path / "p.pt"))
    assert "prompt 1 holds a sparse_coo tensor: token ids must be a dense tensor" in line, line


@pytest.mark.parametrize("env,name", [
    ({"RANK": "banana", "WORLD_SIZE": "3"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "-1"}, "WORLD_SIZE"),
    ({"RANK": "3", "WORLD_SIZE": "3"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "3", "MASTER_PORT": "99999"}, "MASTER_PORT"),
])
@pytest.mark.parametrize("argv", [("run", "--config", TINY_CONFIG, "--backend", "gloo"),
                                  ("bench", "comm", "--backend", "gloo")])
def test_torchruns_environment_is_checked_like_a_flag(capsys, monkeypatch, no_ranks, env, name, argv):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = refused(capsys, *argv)
    assert f"bad environment variable: {name} = '{env[name]}'" in line, line


def test_nccl_under_torchrun_without_a_gpu_names_the_real_rank(capsys, monkeypatch, no_ranks):
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "_gpus", lambda: 0)
    for key, value in {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    line = refused(capsys, "run", "--config", TINY_CONFIG, "--backend", "nccl")
    assert "rank 2 uses GPU 0 (LOCAL_RANK)" in line, line


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("flag", ["--dump", "--trace"])
def test_an_output_onto_a_symlink_loop_is_refused_first(tmp_path, capsys, no_ranks, command, flag):
    path = tmp_path / ("out.json" if flag == "--trace" else "out")
    _loop(path)
    line = refused(capsys, *COMMANDS[command], flag, str(path))
    assert f"{flag} = '{path}': is a symlink loop" in line, line


class _Out:
    sequences, first_logits = [[1, 2, 3]], None


def test_a_dump_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from pyengine.cli.generate_run import write_dump
    from pyengine.core.spec import load_spec

    spec, target = load_spec(MODEL), tmp_path / "d"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", full_disk)  # spec.json, written after generated.pt
    with pytest.raises(OSError):
        write_dump(str(target), spec, _Out())
    assert sorted(os.listdir(tmp_path)) == []  # no half-written dump, no temporary folder left
    monkeypatch.undo()
    (target).mkdir()
    (target / "mine.txt").write_text("kept")
    write_dump(str(target), spec, _Out())
    assert sorted(os.listdir(target)) == ["generated.pt", "mine.txt", "spec.json"]
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_an_existing_dump_with_a_folder_in_a_files_place_is_left_untouched(tmp_path):
    """A folder named spec.json appearing after the checks: no file of the dump is replaced."""
    from pyengine.cli.generate_run import write_dump
    from pyengine.core.spec import load_spec

    target = tmp_path / "d"
    target.mkdir()
    (target / "generated.pt").write_text("old")
    (target / "spec.json").mkdir()
    with pytest.raises(OSError, match="spec.json is not a file; no file of the dump was written"):
        write_dump(str(target), load_spec(MODEL), _Out())
    assert (target / "generated.pt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folder left


@pytest.mark.parametrize("command", ["run", "generate"])
def test_a_dump_folder_with_a_folder_in_a_files_place_is_refused_first(tmp_path, capsys, no_ranks, command):
    (tmp_path / "d" / "spec.json").mkdir(parents=True)
    line = refused(capsys, *COMMANDS[command], "--dump", str(tmp_path / "d"))
    assert "holds spec.json, which is not a file" in line, line


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("trace,dump", [("same.json", "same.json"), ("d/spec.json", "d"),
                                        ("d/./spec.json", "d/")])
def test_outputs_naming_the_same_path_are_refused_first(tmp_path, capsys, no_ranks, command, trace, dump):
    (tmp_path / "d").mkdir()
    line = refused(capsys, *COMMANDS[command], "--trace", str(tmp_path / trace), "--dump", str(tmp_path / dump))
    assert "--trace" in line and "is also where --dump" in line, line
    assert sorted(os.listdir(tmp_path)) == ["d"]  # nothing written


@pytest.mark.parametrize("command", ["run", "generate"])
def test_a_path_holding_a_newline_is_echoed_escaped_on_one_line(tmp_path, capsys, no_ranks, command):
    path = str(tmp_path / "no\nsuch" / "t.json")  # its folder (named with a newline) does not exist
    line = refused(capsys, *COMMANDS[command], "--trace", path)
    assert "no\\nsuch/t.json'" in line and "the folder" in line and "no\\nsuch does not exist" in line, line


def test_a_written_path_holding_a_newline_is_one_line(tmp_path, capsys):
    folder = tmp_path / "new\nline"
    folder.mkdir()
    assert main(["simulate", "--config", TINY_CONFIG, "--trace", str(folder / "t.json"), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"wrote trace {tmp_path}/new\\nline/t.json"], err
