"""Constants and small helpers shared by the test folders (importable: pytest's pythonpath)."""

from importlib import resources


def packaged_config(name: str) -> str:
    """Path of a config shipped in the package (pyengine/configs/<name>)."""
    return str(resources.files("pyengine").joinpath("configs", name))


TINY_CONFIG = packaged_config("tiny_cpu.json")
"""2 x 24 tokens, H 48, F 40 split 0.4/0.6 over GPUs 1-2, E 5, k 2, V 101, fp32, m 3, partials."""


SMALL = {  # B 2 x S 13 (odd), H 24, F 29 (prime: no tile divides it), E 5, k 2, V 37, fp32, m 4
    "hardware": {"num_gpus": 3, "gpu_memory_gb": 32, "interconnect": "nvlink"},
    "model": {"batch_size": 2, "seq_len": 13, "hidden_size": 24, "ffn_hidden_size": 29,
              "num_experts": 5, "top_k": 2, "vocab_size": 37, "dtype": "float32"},
    "parallel": {"stages": [{"name": "embed", "gpus": [0]},
                            {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2},
                            {"name": "output", "gpus": [0]}]},
    "schedule": {"kind": "gpipe", "micro_batches": 4},
    "comm": {"boundary": "all_reduce", "overlap": True, "timeout_s": 20},
}
"""The one full spec the tests write out: the seed's V (TP over GPUs 1-2, embed and output on
GPU 0) at small odd sizes. Tests change it through small_spec, section by section."""


def small_spec(*, experts: dict | None = None, output: int = 0, **sections):
    """SMALL with each given section's keys replacing its own (`model={"top_k": 1}` keeps the
    rest of the model); `experts`: the experts stage's keys (with "parallel_mode": "expert" the
    TP size is dropped); `output`: the output stage's GPU."""
    from pyengine.core.spec import DeploymentSpec

    d = {k: dict(v) for k, v in SMALL.items()}
    for key, value in sections.items():
        d[key] = {**SMALL.get(key, {}), **value}
    if experts is not None or output != 0:
        st = dict(SMALL["parallel"]["stages"][1])
        if (experts or {}).get("parallel_mode") == "expert":
            st.pop("tensor_parallel_size")
        st.update(experts or {})
        d["parallel"] = {"stages": [{"name": "embed", "gpus": [0]}, st, {"name": "output", "gpus": [output]}]}
    return DeploymentSpec.from_dict(d)


def _threads(body, world: int, timeout_s: float) -> tuple[list, bool]:
    """body(rank) on one thread per virtual rank: per rank its result or the exception it
    raised, and whether one was still running after timeout_s (a hang)."""
    import threading

    out: list = [None] * world

    def run(r):
        try:
            out[r] = body(r)
        except BaseException as e:  # handed to the caller, with its rank
            out[r] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return out, any(t.is_alive() for t in threads)


def each_rank(body, world: int = 3, timeout_s: float = 60) -> list:
    """Per rank, in rank order, body(rank)'s result or the exception it raised (for tests of
    what every rank refuses); a rank still running after timeout_s fails the caller's test."""
    out, hung = _threads(body, world, timeout_s)
    assert not hung, "a rank hung"
    return out


def on_threads(body, world: int = 3, timeout_s: float = 60) -> list:
    """body(rank) on one thread per virtual rank; their results in rank order. A rank that
    raises fails the caller's test with its rank; one still running after timeout_s is a hang."""
    out, hung = _threads(body, world, timeout_s)
    errors = [(r, o) for r, o in enumerate(out) if isinstance(o, BaseException)]
    assert not errors, errors
    assert not hung, "a virtual rank hung"
    return out


def uneven_seed():
    """The seed with its experts tensor-parallel over all three GPUs (F 0.2/0.4/0.4, GPU 0 in the
    group), the output head on GPU 1 and three micro-batches: a layout off the seed's V."""
    from pyengine.core.spec import load_spec

    return load_spec(None).replace(parallel={"stages": [
        {"name": "embed", "gpus": [0]},
        {"name": "experts", "gpus": [0, 1, 2], "tensor_parallel_size": 3, "shard_fractions": [0.2, 0.4, 0.4]},
        {"name": "output", "gpus": [1]}]}, schedule={"micro_batches": 3})


class RecordingBars:
    """Stands in for pyengine.core.progress.progress: records each bar as a Bar (total, what,
    enabled, steps advanced), so tests can check who draws and how far, without a terminal."""

    class Bar:
        def __init__(self, total, what, enabled):
            self.total, self.what, self.enabled, self.steps = total, what, enabled, []

    def __init__(self):
        self.bars: list[RecordingBars.Bar] = []

    def __call__(self, total, what, enabled=True, console=None):
        import contextlib

        bar = RecordingBars.Bar(total, what, enabled)
        self.bars.append(bar)

        @contextlib.contextmanager
        def opened():
            yield lambda n=1: bar.steps.append(n)
        return opened()

    def drawn(self) -> list:
        return [b for b in self.bars if b.enabled]
