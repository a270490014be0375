"""`--weights DIR` without `--config`: the packaged seed's layout around the checkpoint's model, its
batch shape the seed's (or the prompts'), with the flags that override the config applied."""

import json

import pytest
import torch

from pyengine.cli.main import main


@pytest.fixture(scope="module")
def folder(checkpoint):
    return str(checkpoint("mixtral")[0])


@pytest.mark.parametrize("layer", [[], ["--layer", "1"]])
def test_run_with_the_default_layout(folder, capsys, layer):
    assert main(["run", "--weights", folder, *layer, "--iters", "1", "--warmup", "0", "--no-baselines",
                 "--backend", "local", "--micro-batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["ok"] and out["tokens_per_batch"] == 1024  # the seed's batch: 1 x 1024


@pytest.mark.parametrize("prompts", [None, [[3, 4, 5], [6]]])
def test_generate_with_the_default_layout(folder, capsys, tmp_path, prompts):
    tokens = []
    if prompts is not None:
        torch.save([torch.tensor(p) for p in prompts], tmp_path / "p.pt")
        tokens = ["--tokens", str(tmp_path / "p.pt")]
    assert main(["generate", "--weights", folder, *tokens, "--max-new-tokens", "2", "--warmup", "0",
                 "--backend", "local", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sequences"] == (1 if prompts is None else 2)
