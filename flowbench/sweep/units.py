"""Planning: what a sweep runs, and the identity of each piece.

A sweep is planned in *units*: a grid trial, or a search group (Optuna samples of one model, data
set and variant, then the best sample on every seed). A unit's identity is the hash of its fully
expanded configuration (``TrialConfig.config_hash``): a re-run runs exactly the units without a
record of their current hash. Planning needs shapes, never images (``check_data``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from flowbench.data import DatasetInfo
from flowbench.sweep.spec import SweepSpec, check_data, expand, load_sweep_spec, trial_config
from flowbench.trial import TrialConfig


def plan(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig]]:
    """Validate everything a sweep needs (spec, models, data) and expand its trials."""
    spec, configs, _ = plan_sweep(spec_path)
    return spec, configs


def plan_sweep(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig], dict[str, DatasetInfo]]:
    spec = load_sweep_spec(spec_path)
    infos = check_data(spec, spec_path)
    return spec, expand(spec, infos), infos


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
