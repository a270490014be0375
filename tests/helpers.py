"""Constants and small helpers shared by the test folders (importable: pytest's pythonpath)."""

from importlib import resources


def packaged_config(name: str) -> str:
    """Path of a config shipped in the package (pyengine/configs/<name>)."""
    return str(resources.files("pyengine").joinpath("configs", name))


TINY_CONFIG = packaged_config("tiny_cpu.json")
"""2 x 24 tokens, H 48, F 40 split 0.4/0.6 over GPUs 1-2, E 5, k 2, V 101, fp32, m 3, partials."""
