"""Model cards (``models/<name>.yaml``): the paper each architecture follows, its
hyperparameters per data set, and the bits/dim the n×n-convolution paper's Table 2 reports."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Literal

import pydantic

from flowbench.errors import FlowbenchError
from flowbench.flows.registry import model_entry
from flowbench.specfile import load_spec


class Recipe(pydantic.BaseModel):
    """How the source trained this model on this data set: what a trial uses unless a spec or the
    CLI says otherwise. ``source`` names where each value comes from (file, flag, section)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    optimizer: Literal["adam", "adamax"] = "adam"
    lr: float = pydantic.Field(gt=0)
    warmup_steps: int = pydantic.Field(0, ge=0)  # linear warm-up of the learning rate from 0
    batch_size: int = pydantic.Field(ge=1)  # global batch (all GPUs of the source's run)
    grad_clip: float | None = pydantic.Field(None, gt=0)  # max gradient norm; None: no clipping
    n_bits: int = pydantic.Field(8, ge=1, le=8)
    source: str
    notes: str = ""  # details of the source that flowbench does not reproduce, said plainly

    def train_settings(self) -> dict:
        """The recipe as TrialConfig fields (n_bits is an architecture hyperparameter there)."""
        return self.model_dump(include={"optimizer", "lr", "warmup_steps", "batch_size", "grad_clip"})


class DatasetCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    hparams: dict = {}
    recipe: Recipe | None = None
    paper_bpd: float | None = None


class ModelCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    paper: str
    url: str | None = None
    code: str | None = None  # the authors' released code the card follows
    datasets: dict[str, DatasetCard]

    def hparams_for(self, dataset: str) -> dict:
        """The card's hyperparameters for ``dataset``; builder defaults where the card has none."""
        card = self.datasets.get(dataset)
        return dict(card.hparams) if card else {}

    def recipe_for(self, dataset: str) -> Recipe | None:
        card = self.datasets.get(dataset)
        return card.recipe if card else None

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
