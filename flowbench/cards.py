"""Model cards (``models/<name>.yaml``): the paper each architecture follows, its
hyperparameters per data set, the bits/dim the n×n-convolution paper's Table 2 reports and the
bits/dim the architecture's own paper reports (``published``, with the table it comes from)."""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal

import pydantic

from flowbench.errors import FlowbenchError
from flowbench.flows.registry import model_entry
from flowbench.specfile import FieldError, error_location, load_spec

# The valid ranges of the built-in flows' hyperparameters (their builders declare only defaults,
# whose types give each one's type): counts are at least 1, images hold at most 8 bits, and the
# logit preprocessing's margin alpha keeps alpha + (1 - 2 alpha) x inside (0, 1).
HPARAM_RANGES: dict[str, dict[str, Any]] = {  # keyword arguments of pydantic.Field
    **{count: {"ge": 1} for count in ("depth", "levels", "hidden_channels", "n_blocks", "kernel_size")},
    **{rank: {"ge": 1} for rank in ("channel_rank", "spatial_rank", "height_rank", "width_rank")},  # Woodbury's d
    "butterfly_levels": {"ge": 0},
    "coeff": {"gt": 0, "lt": 1},  # the convolution exponential's bound on its kernel's norm
    "n_bits": {"ge": 1, "le": 8},
    "alpha": {"gt": 0, "lt": 0.5},
}


@functools.cache
def _hparams_model(name: str) -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {
        key: (Any if default is None else type(default), pydantic.Field(default, **HPARAM_RANGES.get(key, {})))
        for key, default in model_entry(name).hparams().items()
    }
    return pydantic.create_model(
        f"{name} hyperparameters", __config__=pydantic.ConfigDict(extra="forbid", allow_inf_nan=False), **fields
    )


def check_hparams(name: str, hparams: dict) -> dict:
    """``hparams`` of model ``name`` typed as its builder's defaults ('4' and 4.0 become 4) and in
    range; raises FieldError naming the key. Only the keys given are returned."""
    try:
        valid = _hparams_model(name).model_validate(hparams)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc, message = error_location(first)
        if first["type"] == "extra_forbidden":
            message = f"{name} has no such hyperparameter (it accepts {', '.join(model_entry(name).hparams())})"
        raise FieldError(loc, message) from None
    return valid.model_dump(include=set(hparams))


class Recipe(pydantic.BaseModel):
    """How the source trained this model on this data set: what a trial uses unless a spec or the
    CLI says otherwise. ``source`` names where each value comes from (file, flag, section)."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
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


class Published(pydantic.BaseModel):
    """The bits/dim the architecture's own paper reports on a data set, and where: a table of that
    paper; bpd null with "not reported" (the paper has none) or "not read" (it has one that was not
    read when the card was written: to be filled). A figure from a secondary source says so in ``source``."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    bpd: float | None = pydantic.Field(gt=0)
    source: str = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _not_reported_said(self):
        if self.bpd is None and not self.source.startswith(("not reported", "not read")):
            raise ValueError('a null bpd needs a source that starts "not reported" or "not read", and says why')
        return self


class DatasetCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    hparams: dict = {}
    recipe: Recipe | None = None
    paper_bpd: float | None = pydantic.Field(None, gt=0)  # the n×n paper's Table 2
    published: Published | None = None  # the architecture's own paper


class ModelCard(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    paper: str
    url: str | None = None
    code: str | None = None  # the authors' released code the card follows
    # how the mixer is inverted: "closed form" (a matrix inverse), "parallel solve" (independent
    # solves, e.g. per frequency), "wavefront" (parallel within anti-diagonals, sequential across),
    # "sequential" (pixel by pixel), "series" (a truncated power series); none for a flow without one
    inverse: Literal["closed form", "parallel solve", "wavefront", "sequential", "series"] | None = None
    datasets: dict[str, DatasetCard]

    @pydantic.model_validator(mode="after")
    def _hparams_typed(self):
        try:
            model_entry(self.name)
        except FlowbenchError:
            return self  # load_card reports a card naming another model
        for dataset, card in self.datasets.items():
            try:
                card.hparams = check_hparams(self.name, card.hparams)
            except FieldError as err:
                raise FieldError(("datasets", dataset, "hparams", *err.loc), str(err)) from None
        return self

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

    def published(self, dataset: str) -> Published | None:
        card = self.datasets.get(dataset)
        return card.published if card else None


def cards_dir() -> Path:
    """``$FLOWBENCH_MODELS_DIR``, else the cards shipped inside the package (``flowbench/models/``,
    package data: found the same from a checkout, an editable install or a wheel)."""
    override = os.environ.get("FLOWBENCH_MODELS_DIR")
    return Path(override) if override else Path(str(importlib.resources.files("flowbench") / "models"))


def load_card(name: str) -> ModelCard:
    entry = model_entry(name)  # an unknown model is reported with a suggestion before looking for files
    # the package's cards (or $FLOWBENCH_MODELS_DIR's), then <name>.yaml beside the module that
    # registers the model: where a flow defined outside the package (a plugin) keeps its card
    candidates = [cards_dir() / f"{name}.yaml", entry.module_dir / f"{name}.yaml"]
    path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise FlowbenchError(
            f"{path}: no model card for {name!r}; add models/{name}.yaml (or {name}.yaml beside "
            f"{entry.builder.__module__}'s file, or set FLOWBENCH_MODELS_DIR to a folder of cards)"
        )
    card = load_spec(path, ModelCard, "model card")
    if card.name != name:
        raise FlowbenchError(f"{path}: card names model {card.name!r}, expected {name!r}")
    return card


def training_settings(model: str, dataset: str, explicit: dict) -> tuple[dict, str]:
    """The card's recipe for (model, dataset) as training settings, with ``explicit`` (a spec's or
    the CLI's values) over it, and a line saying where they come from."""
    recipe = load_card(model).recipe_for(dataset)
    base = recipe.train_settings() if recipe else {}
    source = recipe.source if recipe else f"flowbench defaults (the {model} card has no recipe for {dataset})"
    changed = sorted(k for k, v in explicit.items() if k in Recipe.model_fields and base.get(k, v) != v)
    if changed:
        source += "; overridden: " + ", ".join(f"{k}={explicit[k]}" for k in changed)
    return base | explicit, source
