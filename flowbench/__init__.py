"""flowbench: which normalizing flow is better, on equal budgets?"""

from flowbench.errors import FlowbenchError
from flowbench.flows.registry import build_model, list_models

__version__ = "0.1.0"
__all__ = ["FlowbenchError", "build_model", "list_models", "__version__"]
