"""Bad checkpoints and bad inputs: one line naming the file, tensor or option, exit 2, before any
rank starts (the launcher is replaced by one that fails the test if it is ever called)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_CONFIG
from pyengine.cli.main import main
from pyengine.core.errors import InputError
from pyengine.model.checkpoint import open_checkpoint

LAYER = 1


@pytest.fixture
def no_ranks(monkeypatch):
    import pyengine.execute.launch as launch

    def refuse(*a, **k):
        raise AssertionError("a rank was started for a run that should have been refused")

    monkeypatch.setattr(launch, "run_ranks", refuse)


def run_cli(capsys, *args: str) -> str:
    """`pyengine run ...` in-process: must exit 2 with one line on stderr; returns that line."""
    capsys.readouterr()  # drop what building the checkpoint printed
    assert main(["run", *args]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and cap.out == "", cap.err
    return lines[0]


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def _corrupt_header(folder):
    path = first_shard(folder)
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff{["  # inside the JSON header
    path.write_bytes(bytes(data))
    return path.name, "not a valid safetensors file"


def _truncate(folder):
    path = first_shard(folder)
    path.write_bytes(path.read_bytes()[:-10])
    return path.name, "file not fully covered"


def _short_file(folder):
    path = first_shard(folder)
    path.write_bytes(b"\x01\x02")
    return path.name, "not a valid safetensors file"


def _drop_from_index(folder):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = f"model.layers.{LAYER}.block_sparse_moe.experts.3.w3.weight"
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    return key, "missing from"


def _index_names_wrong_file(folder):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = f"model.layers.{LAYER}.block_sparse_moe.gate.weight"
    other = next(f for f in sorted(set(data["weight_map"].values())) if f != data["weight_map"][key])
    data["weight_map"][key] = other
    index.write_text(json.dumps(data))
    return key, "missing from"


def _delete_shard(folder):
    path = first_shard(folder)
    path.unlink()
    return path.name, "does not exist"


def _wrong_size_in_config(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 14
    (folder / "config.json").write_text(json.dumps(cfg))
    return "has shape [13, 22]", "implies [14, 22]"


def _refused_family(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "deepseek_v2"
    (folder / "config.json").write_text(json.dumps(cfg))
    return "deepseek_v2", "not supported"


def _unknown_family(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    return "llama", "not a supported MoE family"


def _no_safetensors(folder):
    for p in folder.glob("model*"):
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    return "neither model.safetensors", "pytorch_model.bin"


BREAKAGES = [_corrupt_header, _truncate, _short_file, _drop_from_index, _index_names_wrong_file,
             _delete_shard, _wrong_size_in_config, _refused_family, _unknown_family, _no_safetensors]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=[b.__name__.strip("_") for b in BREAKAGES])
def test_broken_checkpoint_is_one_line_exit_2(checkpoint, tmp_path, capsys, no_ranks, breakage):
    folder = copy(checkpoint("mixtral", sharded=True)[0], tmp_path)
    words = breakage(folder)
    with pytest.raises(InputError) as e:
        open_checkpoint(folder, LAYER)
    assert all(w in str(e.value) for w in words), str(e.value)
    line = run_cli(capsys, "--weights", str(folder), "--layer", str(LAYER))
    assert line.startswith("pyengine run: bad input: ") and all(w in line for w in words), line


def test_missing_tensor_in_a_single_file(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy(checkpoint("olmoe")[0], tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    key = f"model.layers.{LAYER}.mlp.experts.4.down_proj.weight"
    del tensors[key]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="missing from .*model.safetensors"):
        open_checkpoint(folder, LAYER)


@pytest.mark.parametrize("layer,words", [(3, "out of range"), (-1, "out of range")])
def test_layer_out_of_range(checkpoint, capsys, no_ranks, layer, words):
    folder = checkpoint("mixtral")[0]
    line = run_cli(capsys, "--weights", str(folder), "--layer", str(layer))
    assert "--layer" in line and words in line and "num_hidden_layers = 3" in line


def test_dense_layer_of_qwen3_is_refused(checkpoint, capsys, no_ranks):
    folder = checkpoint("qwen3_moe", mlp_only_layers=[1])[0]
    line = run_cli(capsys, "--weights", str(folder), "--layer", "1")
    assert "dense MLP layer" in line
    open_checkpoint(folder, 2)  # its other layers are MoE


def test_config_that_disagrees_with_the_checkpoint(checkpoint, tmp_path, capsys, no_ranks):
    cfg = json.loads(open(TINY_CONFIG).read())  # hidden_size 48; the checkpoint's is 22
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    line = run_cli(capsys, "--weights", str(checkpoint("mixtral")[0]), "--config", str(tmp_path / "c.json"))
    assert "model.hidden_size = 48" in line and "hidden_size gives 22" in line


@pytest.mark.parametrize("ids,words", [
    (np.array([[1, 2, 3, 37]]), "id at position [0, 3] is outside the vocabulary [0, 37)"),
    (np.array([1, 2, -1, 4]), "outside the vocabulary"),
    (np.array([[0.5, 1.0]]), "must be integers"),
    (np.zeros((2, 2, 2), dtype=np.int64), "has shape [2, 2, 2]"),
])
def test_bad_token_files(checkpoint, tmp_path, capsys, no_ranks, ids, words):
    np.save(tmp_path / "ids.npy", ids)
    line = run_cli(capsys, "--weights", str(checkpoint("mixtral")[0]), "--tokens", str(tmp_path / "ids.npy"))
    assert "--tokens" in line and words in line, line


def test_token_file_kinds(tmp_path):
    from pyengine.model.tokens import load_tokens

    torch.save(torch.tensor([3, 4, 5], dtype=torch.int32), tmp_path / "a.pt")
    assert load_tokens(tmp_path / "a.pt").tolist() == [[3, 4, 5]]
    np.save(tmp_path / "b.npy", np.arange(6, dtype=np.uint16).reshape(2, 3))
    t = load_tokens(tmp_path / "b.npy")
    assert t.dtype == torch.int64 and t.shape == (2, 3)
    torch.save({"ids": torch.tensor([1])}, tmp_path / "c.pt")
    with pytest.raises(InputError, match="holds a dict"):
        load_tokens(tmp_path / "c.pt")
    (tmp_path / "d.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot be read as a torch file"):
        load_tokens(tmp_path / "d.pt")
    with pytest.raises(InputError, match=r"must be a \.pt"):
        load_tokens(tmp_path / "e.txt")


def test_seeded_run_with_tokens_checks_the_scaled_vocabulary(tmp_path, capsys, no_ranks):
    ids = np.full((1, 1024), 5)
    ids[0, 100] = 31999  # in the seed's V = 32000, not in the CPU-scaled one
    np.save(tmp_path / "ids.npy", ids)
    line = run_cli(capsys, "--tokens", str(tmp_path / "ids.npy"))
    assert "outside the vocabulary" in line and "--no-scale" in line


def test_layer_needs_weights(capsys, no_ranks):
    assert "--layer = 2: needs --weights" in run_cli(capsys, "--layer", "2")


def test_not_a_directory(tmp_path, capsys, no_ranks):
    assert "is not a directory" in run_cli(capsys, "--weights", str(tmp_path / "nowhere"))


def _as_folder(path):
    path.mkdir()


def _as_loop(path):
    path.symlink_to(path.name)


@pytest.mark.parametrize("make,words", [(_as_folder, "is a folder, not a file"),
                                        (_as_loop, "is a symlink loop")])
def test_model_safetensors_that_is_not_a_file_says_what_it_is(checkpoint, tmp_path, capsys, no_ranks,
                                                               make, words):
    folder = copy(checkpoint("mixtral")[0], tmp_path)
    (folder / "model.safetensors").unlink()
    make(folder / "model.safetensors")
    with pytest.raises(InputError, match=words):
        open_checkpoint(folder, LAYER)
    assert words in run_cli(capsys, "--weights", str(folder), "--layer", str(LAYER))


def test_an_unreadable_checkpoint_says_why(checkpoint, tmp_path, monkeypatch):
    import safetensors

    def unreadable(*a, **k):  # as root a chmod cannot make a file unreadable: raise as the OS would
        raise OSError("Input/output error")

    folder = copy(checkpoint("mixtral")[0], tmp_path)
    monkeypatch.setattr(safetensors, "safe_open", unreadable)
    with pytest.raises(InputError) as e:
        open_checkpoint(folder, LAYER)
    assert str(e.value).endswith("cannot be read: Input/output error"), str(e.value)
