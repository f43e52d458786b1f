"""flowbench: which normalizing flow is better, on equal budgets?"""

from typing import TYPE_CHECKING

from flowbench.errors import FlowbenchError

if TYPE_CHECKING:
    from flowbench.flows.registry import build_model, list_models

__version__ = "0.1.0"
__all__ = ["FlowbenchError", "build_model", "list_models", "__version__"]


def __getattr__(name: str):
    # the registry imports torch: loaded on first use, so that a module of the package that needs no
    # torch (the sweep's stop broadcast, in a Ray actor of its own) imports without it
    if name in ("build_model", "list_models"):
        from flowbench.flows import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'flowbench' has no attribute {name!r}")
