"""The sweep spec: YAML validated with pydantic, expanded into one trial config per
(model, dataset, seed). Every mistake is found here, before any trial starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic

import flowbench
from flowbench.cards import load_card
from flowbench.data import DATASETS, NEEDS_ROOT, load_dataset
from flowbench.errors import FlowbenchError, unknown_name
from flowbench.flows.registry import MODELS, model_entry
from flowbench.specfile import load_spec
from flowbench.trial import TrainSettings, TrialConfig

TRAIN_KEYS = ("batch_size", "lr", "warmup_steps", "grad_clip")  # searchable besides model hparams
TIME_ATTR = {"steps": "step", "epochs": "epochs", "images": "images_seen", "seconds": "train_seconds"}


class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class Budget(Strict):
    steps: int | None = pydantic.Field(None, gt=0)
    epochs: float | None = pydantic.Field(None, gt=0)
    seconds: float | None = pydantic.Field(None, gt=0)
    images: int | None = pydantic.Field(None, gt=0)

    @pydantic.model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, epochs, seconds, images (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def amount(self) -> float:
        return getattr(self, self.kind)


class Train(TrainSettings):
    # a sweep's trials are long: rarer evaluations and checkpoints than a single trial's defaults
    eval_every: int = pydantic.Field(500, gt=0)
    checkpoint_every: int = pydantic.Field(1000, gt=0)


class Asha(Strict):
    grace_period: float = pydantic.Field(gt=0)
    reduction_factor: float = pydantic.Field(3, gt=1)


class Search(Strict):
    num_samples: int = pydantic.Field(gt=0)
    space: dict[str, dict[Literal["loguniform", "uniform", "randint", "choice"], list]]
    asha: Asha | None = None

    @pydantic.field_validator("space")
    @classmethod
    def _one_distribution_each(cls, space):
        for key, dist in space.items():
            if len(dist) != 1:
                raise ValueError(f"{key}: give one distribution (loguniform, uniform, randint or choice)")
            (kind, args), = dist.items()
            if kind != "choice" and (len(args) != 2 or not args[0] < args[1]):
                raise ValueError(f"{key}: {kind} takes [low, high] with low < high, got {args}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{key}: loguniform needs a positive lower bound, got {args[0]}")
            if kind == "choice" and not args:
                raise ValueError(f"{key}: choice needs at least one value")
        return space


class Resources(Strict):
    """Per trial; with ``workers`` > 1, per data-parallel worker of the trial (Ray Train DDP)."""

    cpu: float = pydantic.Field(1, gt=0)
    gpu: float = pydantic.Field(0, ge=0)
    workers: int = pydantic.Field(1, ge=1)


class Latency(Strict):
    batch_size: int = pydantic.Field(16, gt=0)
    repeats: int = pydantic.Field(20, gt=0)


def _known(kind: str, known):
    def check(name: str) -> str:
        if name not in known:
            raise ValueError(unknown_name(kind, name, known))
        return name

    return Annotated[str, pydantic.AfterValidator(check)]


ModelName, DatasetName = _known("model", MODELS), _known("data set", DATASETS)


class SweepSpec(Strict):
    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[ModelName] = pydantic.Field(min_length=1)
    datasets: list[DatasetName] = pydantic.Field(min_length=1)
    data_roots: dict[str, str] = {}
    seeds: list[int] = pydantic.Field([0], min_length=1)
    budget: Budget
    train: Train = Train()
    overrides: dict[str, dict] = {}  # per model: hyperparameters and/or train keys
    match_params: int | None = pydantic.Field(None, gt=0)
    search: Search | None = None
    resources: Resources = Resources()
    latency: Latency = Latency()
    max_failures: int = pydantic.Field(2, ge=0)

    @pydantic.field_validator("models", "datasets", "seeds")
    @classmethod
    def _distinct(cls, values, info):
        if len(set(values)) != len(values):
            raise ValueError(f"an entry of {info.field_name} is listed twice")
        return values

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        for name in self.overrides:
            if name not in self.models:
                raise ValueError(f"overrides.{name}: not one of the sweep's models {self.models}")
            accepted = [*model_entry(name).hparams(), *TRAIN_KEYS]
            unknown = sorted(set(self.overrides[name]) - set(accepted))
            if unknown:
                raise ValueError(f"overrides.{name}: unknown key {unknown}; {name} accepts {accepted}")
        for name in self.data_roots:
            if name not in self.datasets:
                raise ValueError(f"data_roots.{name}: not one of the sweep's datasets {self.datasets}")
        if self.search is not None:
            for key in self.search.space:
                if key in TRAIN_KEYS:
                    continue
                lacking = [m for m in self.models if key not in model_entry(m).hparams()]
                if lacking:
                    raise ValueError(f"search.space.{key}: neither a train key {TRAIN_KEYS} nor a hyperparameter "
                                     f"of {lacking}")
            asha = self.search.asha
            if asha is not None and asha.grace_period >= self.budget.amount:
                raise ValueError(f"search.asha.grace_period ({asha.grace_period}) must be below the budget "
                                 f"({self.budget.amount} {self.budget.kind})")
        if self.match_params is not None and self.search is not None and "hidden_channels" in self.search.space:
            raise ValueError("match_params sets hidden_channels: do not search over it too")
        return self


def load_sweep_spec(path: str | Path) -> SweepSpec:
    return load_spec(path, SweepSpec, "sweep spec")


def match_width(model: str, image_shape, hparams: dict, target: int) -> dict:
    """hparams with ``hidden_channels`` chosen so the model has about ``target`` parameters.

    Parameter count grows monotonically with width: bisection over integer widths.
    """
    if "hidden_channels" not in model_entry(model).hparams():
        raise FlowbenchError(f"match_params: model {model!r} has no hidden_channels to scale")

    def count(width):
        return flowbench.build_model(model, image_shape, **(hparams | {"hidden_channels": width})).num_parameters()

    low, high = 1, 8
    while count(high) < target:
        low, high = high, high * 2
        if high > 1 << 14:
            raise FlowbenchError(f"match_params: {model} cannot reach {target:,} parameters by width alone")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < target else (low, mid)
    best = min((low, high), key=lambda w: abs(count(w) - target))
    return hparams | {"hidden_channels": best}


def check_data(spec: SweepSpec, spec_path: str | Path) -> dict[str, tuple]:
    """Load each data set once (the driver's check that every one is there); returns image shapes."""
    shapes = {}
    for dataset in spec.datasets:
        root = spec.data_roots.get(dataset)
        if dataset in NEEDS_ROOT and root is None:
            raise FlowbenchError(f"{spec_path}: datasets: {dataset} needs data_roots.{dataset} (a local folder)")
        if root is not None and not Path(root).is_absolute():
            root = str((Path(spec_path).parent / root).resolve())
            spec.data_roots[dataset] = root
        try:
            shapes[dataset] = load_dataset(dataset, root).image_shape
        except FlowbenchError as err:
            raise FlowbenchError(f"{spec_path}: datasets: {err}") from None
    return shapes


def expand(spec: SweepSpec, image_shapes: dict[str, tuple]) -> list[TrialConfig]:
    """One TrialConfig per (model, dataset, seed): card hparams, then overrides, then match_params."""
    configs = []
    for dataset in spec.datasets:
        for model in spec.models:
            override = spec.overrides.get(model, {})
            train = spec.train.model_dump() | {k: v for k, v in override.items() if k in TRAIN_KEYS}
            hparams = load_card(model).hparams_for(dataset) | {k: v for k, v in override.items() if k not in TRAIN_KEYS}
            if spec.match_params:
                hparams = match_width(model, image_shapes[dataset], hparams, spec.match_params)
            else:  # build once: a model that cannot exist for this data fails here, not in a trial
                flowbench.build_model(model, image_shapes[dataset], **hparams)
            for seed in spec.seeds:
                configs.append(TrialConfig(
                    model=model, dataset=dataset, hparams=hparams, seed=seed,
                    budget_kind=spec.budget.kind, budget=spec.budget.amount,
                    **train, latency_batch_size=spec.latency.batch_size,
                    latency_repeats=spec.latency.repeats, data_root=spec.data_roots.get(dataset),
                    sweep=spec.name, trial_id=f"{model}-{dataset}-seed{seed}",
                ))
    return configs


def trial_config(tune_config: dict) -> dict:
    """The TrialConfig dict a Tune trial runs: the fixed part with searched values merged in."""
    config = dict(tune_config["trial"])
    config["hparams"] = dict(config["hparams"])
    for key, value in tune_config.get("search", {}).items():
        if key in TRAIN_KEYS:
            config[key] = value
        else:
            config["hparams"][key] = value
    if tune_config.get("search"):
        suffix = "-".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(tune_config["search"].items()))
        config["trial_id"] = f"{config['trial_id']}-{suffix}"
    return config
