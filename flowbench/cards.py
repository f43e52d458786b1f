"""Model cards (``models/<name>.yaml``): the paper each architecture follows, its
hyperparameters per data set, and the bits/dim the n×n-convolution paper's Table 2 reports."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pydantic

from flowbench.errors import FlowbenchError
from flowbench.flows.registry import model_entry
from flowbench.specfile import load_spec


class DatasetCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    hparams: dict = {}
    paper_bpd: float | None = None


class ModelCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    paper: str
    url: str | None = None
    datasets: dict[str, DatasetCard]

    def hparams_for(self, dataset: str) -> dict:
        """The card's hyperparameters for ``dataset``; builder defaults where the card has none."""
        card = self.datasets.get(dataset)
        return dict(card.hparams) if card else {}

    def paper_bpd(self, dataset: str) -> float | None:
        card = self.datasets.get(dataset)
        return card.paper_bpd if card else None


def cards_dir() -> Path:
    """``$FLOWBENCH_MODELS_DIR``, else the cards shipped inside the package (``flowbench/models/``,
    package data: found the same from a checkout, an editable install or a wheel)."""
    override = os.environ.get("FLOWBENCH_MODELS_DIR")
    return Path(override) if override else Path(str(importlib.resources.files("flowbench") / "models"))


def load_card(name: str) -> ModelCard:
    model_entry(name)  # an unknown model is reported with a suggestion before looking for files
    path = cards_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FlowbenchError(f"{path}: no model card for {name!r}; add models/{name}.yaml (or set FLOWBENCH_MODELS_DIR to a folder of cards)")
    card = load_spec(path, ModelCard, "model card")
    if card.name != name:
        raise FlowbenchError(f"{path}: card names model {card.name!r}, expected {name!r}")
    return card
