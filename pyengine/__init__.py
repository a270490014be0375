"""pyengine: a 3-GPU hybrid tensor + pipeline parallel MoE engine.

Import cost is kept small: torch, triton and the native extension load on first use.
"""

from pyengine.core.spec import DeploymentSpec, SpecError, load_spec

__all__ = ["DeploymentSpec", "Engine", "SpecError", "load_spec", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":  # pulls in torch: loaded on first use only
        # the execute layer's Engine with serving's submit / step / follow added
        from pyengine.serve.engine_api import ServingEngine

        return ServingEngine
    raise AttributeError(f"module 'pyengine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
