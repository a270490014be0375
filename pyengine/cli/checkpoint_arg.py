"""`--weights DIR [--layer N]` opened for a command: the library names its arguments (`folder`,
`layer`); the command line names its flags, so each refusal is told in the flag the user typed."""

from __future__ import annotations

from pyengine.core.errors import InputError

FLAGS = {"folder": "--weights", "layer": "--layer"}


def open_weights(folder: str, layer: int | None = None):
    from pyengine.model.checkpoint import open_checkpoint

    try:
        return open_checkpoint(folder, layer)
    except InputError as e:
        if e.field not in FLAGS:
            raise
        raise InputError(FLAGS[e.field], e.value, e.rule.replace("layer=N", "--layer N")) from None
