"""The flow library: pure torch layers and models; knows nothing of Ray, MLflow or files."""

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import Flow, FlowSequence
from flowbench.flows.conv1x1 import InvConv1x1, InvConv1x1LU
from flowbench.flows.coupling import AffineCoupling
from flowbench.flows.emerging import EmergingConv2d, MaskedAutoregressiveConv2d
from flowbench.flows.models import FlowModel
from flowbench.flows.multiscale import Level, SplitPrior, Squeeze, TopPrior
from flowbench.flows.periodic import PeriodicConv2d
from flowbench.flows.preprocess import CenterPreprocess, LogitPreprocess, dequantize, quantize
from flowbench.flows.registry import build_model, list_models, model_entry, register_model
from flowbench.flows.shift import InvertibleNxNConv, InvertibleShift, fold_shift_into_actnorm

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CenterPreprocess",
    "EmergingConv2d",
    "Flow",
    "FlowModel",
    "FlowSequence",
    "InvConv1x1",
    "InvConv1x1LU",
    "InvertibleNxNConv",
    "InvertibleShift",
    "Level",
    "LogitPreprocess",
    "MaskedAutoregressiveConv2d",
    "PeriodicConv2d",
    "SplitPrior",
    "Squeeze",
    "TopPrior",
    "build_model",
    "dequantize",
    "fold_shift_into_actnorm",
    "list_models",
    "model_entry",
    "quantize",
    "register_model",
]
