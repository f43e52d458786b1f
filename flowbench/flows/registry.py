"""The model registry: ``build_model(name, image_shape, **hparams)`` and ``list_models()``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from flowbench.errors import FlowbenchError, unknown_name
from flowbench.flows.models import (
    FlowModel,
    build_emerging,
    build_glow,
    build_nxn_shift,
    build_periodic,
    build_realnvp,
)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    paper: str
    builder: Callable[..., FlowModel]

    def hparams(self) -> dict:
        """Accepted hyperparameters and their defaults."""
        params = list(inspect.signature(self.builder).parameters.values())[1:]
        return {p.name: p.default for p in params}


MODELS = {
    entry.name: entry
    for entry in [
        ModelEntry("realnvp", "Dinh et al., Density estimation using Real NVP (ICLR 2017)", build_realnvp),
        ModelEntry("glow", "Kingma & Dhariwal, Glow (NeurIPS 2018)", build_glow),
        ModelEntry("emerging", "Hoogeboom et al., Emerging Convolutions (ICML 2019)", build_emerging),
        ModelEntry(
            "nxn_shift",
            "Truong et al., Robust Invertible n×n Convolution (Future Internet 2021)",
            build_nxn_shift,
        ),
        ModelEntry("periodic", "Hoogeboom et al., Emerging Convolutions (ICML 2019), periodic", build_periodic),
    ]
}


def list_models() -> list[str]:
    return list(MODELS)


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise FlowbenchError(unknown_name("model", name, MODELS))
    return MODELS[name]


def build_model(name: str, image_shape, **hparams) -> FlowModel:
    """Build a registered flow for images of shape (C, H, W)."""
    entry = model_entry(name)
    accepted = entry.hparams()
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise FlowbenchError(
            f"model {name!r} has no hyperparameter {', '.join(map(repr, unknown))}: "
            f"it accepts {', '.join(accepted)}"
        )
    try:
        return entry.builder(tuple(image_shape), **hparams)
    except ValueError as err:
        raise FlowbenchError(f"cannot build {name!r} for images {tuple(image_shape)}: {err}") from None
