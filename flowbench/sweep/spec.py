"""The sweep spec: YAML validated with pydantic. Every mistake in the file is found here, before
anything runs; ``flowbench.sweep.plan`` expands a valid spec into its trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic

from flowbench.cards import check_hparams
from flowbench.data import DATASETS
from flowbench.errors import unknown_name
from flowbench.flows.registry import MODELS, model_entry
from flowbench.numerics import Numerics
from flowbench.results.power import DETECT_BPD, TARGET_POWER
from flowbench.specfile import FieldError, error_location, load_spec
from flowbench.trial import TrainSettings

TRAIN_KEYS = ("optimizer", "batch_size", "lr", "warmup_steps", "grad_clip")  # searchable besides model hparams
TIME_ATTR = {
    "steps": "step",
    "epochs": "epochs",
    "images": "images_seen",
    "seconds": "train_seconds",
    "flops": "train_flops",
}


class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


class Budget(Strict):
    steps: int | None = pydantic.Field(None, gt=0)
    epochs: float | None = pydantic.Field(None, gt=0)
    seconds: float | None = pydantic.Field(None, gt=0)
    images: int | None = pydantic.Field(None, gt=0)
    flops: float | None = pydantic.Field(None, gt=0)  # training FLOPs, measured per trial: equal compute

    @pydantic.model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, epochs, seconds, images, flops (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def amount(self) -> float:
        return getattr(self, self.kind)


class Asha(Strict):
    grace_period: float = pydantic.Field(gt=0)
    reduction_factor: float = pydantic.Field(3, gt=1)


FiniteFloat = Annotated[float, pydantic.Field(allow_inf_nan=False)]
BOUNDS: dict[str, pydantic.TypeAdapter] = {  # [low, high] of each distribution; a log scale needs both above 0
    "loguniform": pydantic.TypeAdapter(
        tuple[Annotated[FiniteFloat, pydantic.Field(gt=0)], Annotated[FiniteFloat, pydantic.Field(gt=0)]]
    ),
    "uniform": pydantic.TypeAdapter(tuple[FiniteFloat, FiniteFloat]),
    "randint": pydantic.TypeAdapter(tuple[int, int]),  # high excluded, as in tune.randint
}


class Search(Strict):
    num_samples: int = pydantic.Field(gt=0)
    space: dict[str, dict[Literal["loguniform", "uniform", "randint", "choice"], list]]
    asha: Asha | None = None

    @pydantic.field_validator("space")
    @classmethod
    def _one_distribution_each(cls, space):
        for key, dist in space.items():
            if len(dist) != 1:
                raise FieldError((key,), "give one distribution (loguniform, uniform, randint or choice)")
            ((kind, args),) = dist.items()
            if kind == "choice":
                if not args:
                    raise FieldError((key, kind), "choice needs at least one value")
                continue
            try:
                low, high = BOUNDS[kind].validate_python(args)
            except pydantic.ValidationError as err:
                loc, message = error_location(err.errors()[0])
                raise FieldError((key, kind, *loc), f"{kind} takes [low, high]: {message}") from None
            if not low < high:
                raise FieldError((key, kind), f"{kind} takes [low, high] with low < high, got {args}")
            dist[kind] = [low, high]
        return space


class Resources(Strict):
    """Per trial; with ``workers`` > 1, per data-parallel worker of the trial (Ray Train DDP)."""

    cpu: float = pydantic.Field(1, gt=0)
    gpu: float = pydantic.Field(0, ge=0)
    workers: int = pydantic.Field(1, ge=1)


class Power(Strict):
    """What the report's seeds-needed figures are for: the power each paired comparison had to detect
    ``difference`` bits/dim, and the seeds that would give it ``target`` power."""

    difference: float = pydantic.Field(DETECT_BPD, gt=0)
    target: float = pydantic.Field(TARGET_POWER, gt=0, lt=1)


class Latency(Strict):
    """The sweep's latency phase (``flowbench.sweep.latency``): after training, the selected weights
    timed side by side at each batch size (1: latency; larger: throughput), ``warmup`` calls each,
    then ``rounds`` interleaved rounds; on ``device`` (auto: cuda where the trials had a GPU)."""

    batch_sizes: list[pydantic.PositiveInt] = pydantic.Field([1, 16], min_length=1)
    rounds: int = pydantic.Field(10, ge=2)  # two at least: a paired interval needs a spread
    warmup: int = pydantic.Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @pydantic.model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        if isinstance(data, dict) and {"batch_size", "repeats"} & set(data):
            raise FieldError(
                (sorted({"batch_size", "repeats"} & set(data))[0],),
                "latency is timed after training now, every model side by side: give batch_sizes: [1, 16], "
                "rounds: 10 (and optionally warmup, device) instead of batch_size and repeats",
            )
        return data


def _known(kind: str, known):
    def check(name: str) -> str:
        if name not in known:
            raise ValueError(unknown_name(kind, name, known))
        return name

    return check


ModelName = Annotated[str, pydantic.AfterValidator(_known("model", MODELS))]
DatasetName = Annotated[str, pydantic.AfterValidator(_known("data set", DATASETS))]


class SweepSpec(Strict):
    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[ModelName] = pydantic.Field(min_length=1)
    datasets: list[DatasetName] = pydantic.Field(min_length=1)
    data_roots: dict[str, str] = {}
    seeds: list[Annotated[int, pydantic.Field(ge=0)]] = pydantic.Field([0], min_length=1)
    budget: Budget
    train: TrainSettings = TrainSettings()
    overrides: dict[str, dict] = {}  # per model: hyperparameters and/or train keys
    match_params: int | None = pydantic.Field(None, gt=0)
    # ablation variants: per hyperparameter its values, run as a product for every model that has it
    grid: dict[str, list] = {}
    search: Search | None = None
    resources: Resources = Resources()
    latency: Latency = Latency()
    power: Power = Power()
    max_failures: int = pydantic.Field(2, ge=0)
    numerics: Numerics = "native"  # portable: the same bits on every x86-64 CPU with AVX2 (reference runs)

    @pydantic.field_validator("models", "datasets", "seeds")
    @classmethod
    def _distinct(cls, values, info):
        if len(set(values)) != len(values):
            raise ValueError(f"an entry of {info.field_name} is listed twice")
        return values

    # keys of a trimmed spec that name a registered model or data set the sweep does not run: not a
    # mistake worth stopping for (``load_spec`` warns with their lines); they are dropped
    _ignored: list[tuple[tuple, str]] = pydantic.PrivateAttr(default_factory=list)

    def ignored(self) -> list[tuple[tuple, str]]:
        return self._ignored

    def _drop_unused(self, section: str, used: list[str], known, kind: str) -> None:
        entries = getattr(self, section)
        for name in list(entries):
            if name not in known:
                raise FieldError((section, name), unknown_name(kind, name, known))
            if name not in used:
                del entries[name]
                self._ignored.append(((section, name), f"{name} is not one of the sweep's {kind}s {used}: ignored"))

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        self._drop_unused("overrides", self.models, MODELS, "model")
        self._drop_unused("data_roots", self.datasets, DATASETS, "data set")
        for name in self.overrides:
            accepted = [*model_entry(name).hparams(), *TRAIN_KEYS]
            unknown = sorted(set(self.overrides[name]) - set(accepted))
            if unknown:
                raise FieldError(("overrides", name, unknown[0]), f"unknown key {unknown}; {name} accepts {accepted}")
            for key, value in self.overrides[name].items():
                self.overrides[name][key] = _valid_value(key, value, [name], ("overrides", name, key))
        if self.search is not None:
            for key, dist in self.search.space.items():
                if key not in TRAIN_KEYS:
                    lacking = [m for m in self.models if key not in model_entry(m).hparams()]
                    if lacking:
                        raise FieldError(
                            ("search", "space", key),
                            f"neither a train key {TRAIN_KEYS} nor a hyperparameter of {lacking}",
                        )
                _check_distribution(key, dist, self.models)
            asha = self.search.asha
            if asha is not None and asha.grace_period >= self.budget.amount:
                raise FieldError(
                    ("search", "asha", "grace_period"),
                    f"{asha.grace_period:g} must be below the budget ({self.budget.amount:g} {self.budget.kind})",
                )
        for key, values in self.grid.items():
            having = [m for m in self.models if key in model_entry(m).hparams()]
            if not having:
                raise FieldError(("grid", key), f"not a hyperparameter of any of the sweep's models {self.models}")
            if not values:
                raise FieldError(("grid", key), "give at least one value")
            if len({variant_text(v) for v in values}) != len(values):
                raise FieldError(("grid", key), f"a value is listed twice in {values}")
            if self.search is not None and key in self.search.space:
                raise FieldError(("grid", key), f"also searched (search.space.{key}): give it in one place")
            if key == "hidden_channels" and self.match_params is not None:
                raise FieldError(("grid", key), "match_params sets hidden_channels: do not grid over it too")
            self.grid[key] = [_valid_value(key, v, having, ("grid", key, i)) for i, v in enumerate(values)]
        if self.match_params is not None and self.search is not None and "hidden_channels" in self.search.space:
            raise FieldError(
                ("search", "space", "hidden_channels"), "match_params sets hidden_channels: do not search over it too"
            )
        return self


def _valid_value(key: str, value, models: list[str], loc: tuple):
    """``value`` for a train key or a hyperparameter of ``models``, typed and range-checked by the
    field it sets (TrainSettings, or the builder's via the card rules); FieldError at ``loc``."""
    if key in TRAIN_KEYS:
        try:
            return getattr(TrainSettings.model_validate({key: value}), key)
        except pydantic.ValidationError as err:
            raise FieldError(loc, error_location(err.errors()[0])[1]) from None
    for model in models:
        try:
            value = check_hparams(model, {key: value})[key]
        except FieldError as err:
            raise FieldError(loc, f"{err} (a {model} hyperparameter)") from None
    return value


def _check_distribution(key: str, dist: dict, models: list[str]) -> None:
    """Every value a search can draw is one its field accepts: the bounds (randint's high is
    excluded) or each choice; an integer field is searched with randint or choice only."""
    ((kind, args),) = dist.items()
    loc = ("search", "space", key, kind)
    integer = (
        TrainSettings.model_fields[key].annotation is int
        if key in TRAIN_KEYS
        else any(type(model_entry(m).hparams()[key]) is int for m in models)
    )
    if integer and kind in ("uniform", "loguniform"):
        raise FieldError(loc, f"{key} is an integer: search it with randint or choice")
    values = [args[0], args[1] - 1] if kind == "randint" else args
    for i, value in enumerate(values):
        _valid_value(key, value, [m for m in models if key in model_entry(m).hparams()], (*loc, i))


def load_sweep_spec(path: str | Path) -> SweepSpec:
    return load_spec(path, SweepSpec, "sweep spec")


def variant_text(value) -> str:
    """A grid value as it appears in a variant's name (booleans lower-case, as YAML writes them)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
