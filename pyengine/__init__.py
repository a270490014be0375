"""pyengine: a 3-GPU hybrid tensor + pipeline parallel MoE engine.

Import cost is kept small: torch, triton and the native extension load on first use.
"""

from pyengine.spec import DeploymentSpec, SpecError, load_spec

__all__ = ["DeploymentSpec", "SpecError", "load_spec", "__version__"]
__version__ = "0.1.0"
