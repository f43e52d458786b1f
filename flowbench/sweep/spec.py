"""The sweep spec: YAML validated with pydantic, expanded into one trial config per
(model, dataset, seed). Every mistake is found here, before any trial starts."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import torch

import flowbench
from flowbench.cards import check_hparams, load_card, training_settings
from flowbench.data import DATASETS, NEEDS_ROOT, DatasetInfo, dataset_info, published_info
from flowbench.data.remote import is_remote
from flowbench.errors import FlowbenchError, unknown_name
from flowbench.flows.registry import MODELS, model_entry
from flowbench.numerics import Numerics
from flowbench.results.power import DETECT_BPD, TARGET_POWER
from flowbench.specfile import FieldError, error_location, load_spec
from flowbench.trial import TrainSettings, TrialConfig

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
    batch_size: int = pydantic.Field(16, gt=0)
    repeats: int = pydantic.Field(20, gt=0)


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


@contextlib.contextmanager
def one_thread():
    """Build models on one thread: their orthogonal initialisations (many small QRs) crawl when
    threads contend on a busy machine, and nothing built for planning is large enough to share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def check_data(spec: SweepSpec, spec_path: str | Path, absent: dict[str, str] | None = None) -> dict[str, DatasetInfo]:
    """Each data set's shape and split sizes, read without loading pixels (the driver's check
    that every one is there). With ``absent`` (planning, where the files need not be), a data set
    whose files are not found is described by its published shape and sizes (``published_info``),
    and why in ``absent[name]``."""
    infos = {}
    for dataset in spec.datasets:
        root = spec.data_roots.get(dataset)
        published = published_info(dataset) if absent is not None else None
        if dataset in NEEDS_ROOT and root is None:
            if published is not None and absent is not None:
                infos[dataset], absent[dataset] = published, f"no data_roots.{dataset} given"
                continue
            raise FlowbenchError(f"{spec_path}: datasets: {dataset} needs data_roots.{dataset} (a local folder)")
        if root is not None and not is_remote(root) and not Path(root).is_absolute():
            root = str((Path(spec_path).parent / root).resolve())
            spec.data_roots[dataset] = root
        try:
            infos[dataset] = dataset_info(dataset, root)
        except FlowbenchError as err:
            if published is None or absent is None:
                raise FlowbenchError(f"{spec_path}: datasets: {err}") from None
            infos[dataset], absent[dataset] = published, str(err)
    return infos


def data_fingerprint(info: DatasetInfo) -> str:
    """What of a data set is part of a trial's identity: its shape, bit depth and split sizes."""
    return json.dumps(
        {"image_shape": list(info.image_shape), "n_bits": info.n_bits, "sizes": info.sizes}, sort_keys=True
    )


def variant_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def grid_settings(spec: SweepSpec, model: str) -> list[dict]:
    """The product of the spec's grid over the hyperparameters ``model`` has ([{}]: no grid)."""
    keys = sorted(k for k in spec.grid if k in model_entry(model).hparams())
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(spec.grid[k] for k in keys))]


def expand(spec: SweepSpec, infos: dict[str, DatasetInfo]) -> list[TrialConfig]:
    """One TrialConfig per (model, dataset, grid variant, seed): card hparams, then overrides, then
    the variant's values, then match_params. A variant is named by its settings, sorted by key
    ("actnorm=false,learned_prior=true"); its trial id is MODEL-DATASET-VARIANT-seedN."""
    configs = []
    for dataset in spec.datasets:
        for model in spec.models:
            override = spec.overrides.get(model, {})
            # the card's recipe, then what the spec's train: sets explicitly, then per-model overrides
            explicit = spec.train.model_dump(exclude_unset=True) | {
                k: v for k, v in override.items() if k in TRAIN_KEYS
            }
            recipe, source = training_settings(model, dataset, explicit)
            train = spec.train.model_dump() | recipe
            card = load_card(model).hparams_for(dataset) | {k: v for k, v in override.items() if k not in TRAIN_KEYS}
            for setting in grid_settings(spec, model):
                variant = ",".join(f"{k}={variant_text(v)}" for k, v in setting.items())
                hparams = card | setting
                with one_thread():
                    if spec.match_params:
                        hparams = match_width(model, infos[dataset].image_shape, hparams, spec.match_params)
                    else:  # build once: a model that cannot exist for this data fails here, not in a trial
                        flowbench.build_model(model, infos[dataset].image_shape, **hparams)
                stem = "-".join(part for part in (model, dataset, variant) if part)
                for seed in spec.seeds:
                    configs.append(
                        TrialConfig(
                            model=model,
                            dataset=dataset,
                            hparams=hparams,
                            variant=variant,
                            seed=seed,
                            data_fingerprint=data_fingerprint(infos[dataset]),
                            budget_kind=spec.budget.kind,
                            budget=spec.budget.amount,
                            **train,
                            recipe_source=source,
                            latency_batch_size=spec.latency.batch_size,
                            latency_repeats=spec.latency.repeats,
                            numerics=spec.numerics,
                            data_root=spec.data_roots.get(dataset),
                            sweep=spec.name,
                            trial_id=f"{stem}-seed{seed}",
                        )
                    )
    return configs


def trial_config(trial: dict, search: dict) -> dict:
    """A TrialConfig dict (``trial``, as planned) with searched values merged in: training settings
    at the top, the model's hyperparameters under ``hparams``."""
    config = dict(trial)
    config["hparams"] = dict(config["hparams"])
    for key, value in search.items():
        if key in TRAIN_KEYS:
            config[key] = value
        else:
            config["hparams"][key] = value
    return config
