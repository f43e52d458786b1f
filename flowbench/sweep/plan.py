"""The plan: a sweep spec expanded into what the sweep runs, and the identity of each piece. The one
place a spec becomes trials: ``plan_sweep`` (the driver and the CLI call it once).

A sweep is planned in *units*: a grid trial, or a search group (Optuna samples of one model, data
set and variant, then the best sample on every seed). A unit's identity is the hash of its fully
expanded configuration (``TrialConfig.config_hash``): a re-run runs exactly the units without a
record of their current hash. Planning needs shapes, never images (``check_data``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
from pathlib import Path

import torch

import flowbench
from flowbench.cards import load_card, training_settings
from flowbench.data import NEEDS_ROOT, DatasetInfo, dataset_info, published_info
from flowbench.data.remote import is_remote
from flowbench.errors import FlowbenchError
from flowbench.flows.registry import model_entry
from flowbench.sweep.spec import TRAIN_KEYS, SweepSpec, load_sweep_spec, variant_text
from flowbench.trial import TrialConfig


@dataclasses.dataclass
class SweepPlan:
    """A valid spec, its data sets' shapes and sizes, its trials and the units they run in."""

    spec: SweepSpec
    infos: dict[str, DatasetInfo]
    configs: list[TrialConfig]

    @functools.cached_property
    def units(self) -> list[Unit]:
        return plan_units(self.spec, self.configs, self.infos)


def plan_sweep(spec_path: str | Path) -> SweepPlan:
    """Validate everything a sweep needs (spec, models, data) and expand its trials."""
    spec = load_sweep_spec(spec_path)
    infos = check_data(spec, spec_path)
    return SweepPlan(spec, infos, expand(spec, infos))


def plan(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig]]:
    """The valid spec and its trials (``plan_sweep`` read for those two)."""
    planned = plan_sweep(spec_path)
    return planned.spec, planned.configs


# --------------------------------------------------------------------------- trials: the spec expanded
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


# --------------------------------------------------------------------------- units: what is planned
@dataclasses.dataclass
class Unit:
    """A grid trial (``configs`` one trial) or a search group (``configs`` its trials on every seed,
    searched on the first seed's)."""

    id: str
    hash: str
    configs: list[TrialConfig]
    search: bool
    cost: list[float]  # ordering key, larger first: see estimated_cost


def estimated_cost(config: TrialConfig, info: DatasetInfo) -> list[float]:
    """How long a trial will take, to start the longest first: the images it trains on times the
    parameter count times the pixels (a convolutional flow's FLOPs per image grow with both).
    Budgets in seconds or FLOPs are equal by construction: the parameter count breaks the tie
    (evaluation, latency and figures grow with it)."""
    import flowbench

    model = flowbench.build_model(config.model, info.image_shape, **config.hparams)
    params = float(model.num_parameters())
    pixels = float(math.prod(info.image_shape))
    images = {
        "steps": config.budget * config.batch_size,
        "images": config.budget,
        "epochs": config.budget * info.sizes["train"],
    }
    if config.budget_kind in images:
        return [images[config.budget_kind] * params * pixels, params]
    return [config.budget, params]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def plan_units(spec: SweepSpec, configs: list[TrialConfig], infos: dict[str, DatasetInfo]) -> list[Unit]:
    costs = {}
    for c in configs:  # one model build per (model, dataset, variant): seeds share it
        key = (c.model, c.dataset, c.variant)
        if key not in costs:
            costs[key] = estimated_cost(c, infos[c.dataset])
    if spec.search is None:
        return [Unit(c.trial_id, c.config_hash(), [c], False, costs[(c.model, c.dataset, c.variant)]) for c in configs]
    units = []
    for key in dict.fromkeys((c.model, c.dataset, c.variant) for c in configs):
        group = [c for c in configs if (c.model, c.dataset, c.variant) == key]
        name = "-".join(part for part in key if part)
        identity = [[c.config_hash() for c in group], spec.search.model_dump(mode="json")]
        units.append(Unit(f"search-{name}", digest(identity), group, True, costs[key]))
    return units


def trial_of(tune_config: dict, unit: Unit) -> TrialConfig:
    """The trial a Tune trial runs. Its Tune config only names it (``flowbench.sweep.search.tune_config``:
    its id, its unit, the values searched), as Tune keeps every trial's config in the driver for the
    whole sweep, several times over, and sends it back with every result: the configuration itself
    is the unit's (a search sample: the unit's first trial) with the searched values merged in."""
    trial_id = tune_config["trial_id"]
    base = (
        unit.configs[0] if tune_config["phase"] == "search" else next(c for c in unit.configs if c.trial_id == trial_id)
    )
    trial = trial_config(base.model_dump(), tune_config.get("search", {}))
    return TrialConfig.model_validate(trial | {"trial_id": trial_id})


def sample_id(base: TrialConfig, index: int, values: dict) -> str:
    """A search sample's trial id: unique (the sample's index in its group) and stable (the same
    sampled values under the same index give the same id on a re-run)."""
    stem = base.trial_id.rsplit("-seed", 1)[0]
    return f"{stem}-search{index}-{digest(values)[:6]}"


# the layout of Tune's trial configs: 2 since they name their trial (``trial_of``) instead of holding it.
# An experiment of another layout (an older flowbench's, killed) is neither resumed nor read back: its trials run anew
TUNE_CONFIG_LAYOUT = 2


def experiment_name(units: list[Unit]) -> str:
    """The Tune experiment of exactly these units at these configurations."""
    return "trials-" + digest([TUNE_CONFIG_LAYOUT, sorted((u.id, u.hash) for u in units)])[:10]
