"""Constants and small helpers shared by the test folders (importable: pytest's pythonpath)."""

from importlib import resources


def packaged_config(name: str) -> str:
    """Path of a config shipped in the package (pyengine/configs/<name>)."""
    return str(resources.files("pyengine").joinpath("configs", name))


TINY_CONFIG = packaged_config("tiny_cpu.json")
"""2 x 24 tokens, H 48, F 40 split 0.4/0.6 over GPUs 1-2, E 5, k 2, V 101, fp32, m 3, partials."""


def on_threads(body, world: int = 3, timeout_s: float = 60) -> list:
    """body(rank) on one thread per virtual rank; their results in rank order. A rank that
    raises fails the caller's test with its rank; one still running after timeout_s is a hang."""
    import threading

    out, errors = [None] * world, []

    def run(r):
        try:
            out[r] = body(r)
        except BaseException as e:  # surfaced below, with its rank
            errors.append((r, e))

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a virtual rank hung"
    return out
