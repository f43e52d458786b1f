"""Ray Tune's searcher and scheduler for a whole sweep.

One Tune experiment holds every unit still to run, so no slot idles while another group
searches: ``SweepSearch`` hands Tune the trials longest first (grid trials, search samples, and
each group's final trials as soon as its search has ended) and ``SweepScheduler`` runs ASHA
within each search group only.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from flowbench import stopping
from flowbench.sweep.plan import Unit, sample_id
from flowbench.sweep.spec import TIME_ATTR, Search, SweepSpec

log = logging.getLogger(__name__)
METRIC, MODE = "val_bpd", "min"  # selection (search, ASHA, the best sample) is on validation bits/dim
# the report of a trial that checkpointed where it was because the sweep is stopping: not an
# evaluation; the scheduler pauses the trial on it
INTERRUPTED = "interrupted"


def tune_metrics(metrics: dict, budget_kind: str) -> dict:
    """What of a trial's evaluation or record goes to Tune, which keeps every trial's last result
    and running statistics of each number in it in the driver's memory for the whole sweep: the
    selection metric and ASHA's time attribute, the step, the record's status (the searcher
    prefers samples that reached the budget) and a stop's mark. The curve and the record travel
    in the trial's checkpoints (``flowbench.sweep.worker``)."""
    keys = (METRIC, "step", TIME_ATTR[budget_kind], "status", INTERRUPTED)
    return {k: metrics[k] for k in keys if k in metrics}


# --------------------------------------------------------------------------- Tune: search and schedule
def _search_space(search: Search) -> dict:
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    space = {}
    for key, dist in search.space.items():
        ((kind, args),) = dist.items()
        space[key] = tune.choice(args) if kind == "choice" else make[kind](*args)
    return space


def tune_config(
    unit: Unit, phase: str, trial_id: str, search: dict | None = None, earlier: list[str] | None = None
) -> dict:
    """A Tune trial's config: what names the trial (its id, unit and phase; the values searched), the
    searcher's and scheduler's keys (``cost``, ``phase``, ``unit``), and ``earlier``: checkpoints an
    earlier experiment left of the same trial, newest first, to resume from when Tune has none
    (``flowbench.sweep.worker``). The configuration itself is the unit's: ``trial_of``."""
    config = {"trial_id": trial_id, "unit": unit.id, "unit_hash": unit.hash, "phase": phase, "cost": unit.cost}
    return (
        config
        | ({"search": search} if search is not None else {})
        | ({"earlier_checkpoints": earlier} if earlier else {})
    )


class SweepSearch(Searcher):
    """Tune's searcher for a whole sweep: hands out every trial of ``units``, longest first.

    Grid trials are ready from the start (each with the checkpoints ``earlier`` names for its
    trial id, if any). A search group's samples come from its own Optuna
    study (seeded by the group's first seed); once all of them have ended, the best sample by
    validation bits/dim (among those that reached the budget, else among all) is run on every
    seed of the group under the plain trial ids. At most two trials per slot are handed out
    ahead, so Tune always has the next trial waiting when one ends (its actor is then reused),
    and Optuna samples late enough to learn from the samples before.
    """

    def __init__(self, spec: SweepSpec, units: list[Unit], earlier: dict[str, list[str]] | None = None):
        from ray.tune.search.optuna import OptunaSearch

        super().__init__(metric=METRIC, mode=MODE)
        earlier = earlier or {}
        self.ready: list[dict] = [
            tune_config(u, "final", u.configs[0].trial_id, earlier=earlier.get(u.configs[0].trial_id))
            for u in units
            if not u.search
        ]
        self.groups: dict = {}  # unit id -> its search group's state; looked up with ids that may be None
        for u in units:
            if u.search:
                assert spec.search is not None, "search units come from the spec's search section"
                self.groups[u.id] = {
                    "unit": u,
                    "left": spec.search.num_samples,
                    "index": 0,
                    "live": {},
                    "ended": {},
                    "optuna": OptunaSearch(
                        _search_space(spec.search), metric=METRIC, mode=MODE, seed=u.configs[0].seed
                    ),
                    "finals": False,
                }
        self.live: dict[str, str] = {}  # Tune trial id -> unit id

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # set at construction

    def _candidates(self) -> list[tuple[list[float], int, str]]:
        """(cost, priority, source): finals before samples before grid trials at equal cost."""
        found = [(c["cost"], 0, f"ready:{i}") for i, c in enumerate(self.ready)]
        for gid, g in self.groups.items():
            if g["left"] > 0:
                found.append((g["unit"].cost, 1, f"sample:{gid}"))
        return found

    def suggest(self, trial_id: str):
        candidates = self._candidates()
        if not candidates:
            waiting = any(g["live"] or (g["left"] == 0 and not g["finals"]) for g in self.groups.values())
            return None if waiting else Searcher.FINISHED
        _, _, source = max(candidates, key=lambda c: (c[0], -c[1]))
        kind, key = source.split(":", 1)
        if kind == "ready":
            config = self.ready.pop(int(key))
        else:
            group = self.groups[key]
            values = group["optuna"].suggest(trial_id)
            unit = group["unit"]
            config = tune_config(unit, "search", sample_id(unit.configs[0], group["index"], values), values)
            group["left"] -= 1
            group["index"] += 1
            group["live"][trial_id] = values
        self.live[trial_id] = config["unit"]
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group = self.groups.get(self.live.get(trial_id))
        if group is not None and trial_id in group["live"] and METRIC in result and not result.get(INTERRUPTED):
            group["optuna"].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        unit = self.live.pop(trial_id, None)
        group = self.groups.get(unit)
        if group is None or trial_id not in group["live"]:
            return
        values = group["live"].pop(trial_id)
        result = result or {}  # None: the trial ended without a result
        usable = not error and isinstance(result.get(METRIC), float) and math.isfinite(result[METRIC])
        group["optuna"].on_trial_complete(trial_id, result if usable else None, error=error or not usable)
        if usable:
            group["ended"][trial_id] = {
                "value": result[METRIC],
                "reached": result.get("status") == "ok",
                "search": values,
            }
        if group["left"] == 0 and not group["live"] and not group["finals"]:
            self._add_finals(group)

    def _add_finals(self, group: dict) -> None:
        group["finals"] = True
        ended = list(group["ended"].values())
        pool = [e for e in ended if e["reached"]] or ended
        unit = group["unit"]
        if not pool:
            log.warning("%s: no search sample gave a finite %s; its final trials are not run", unit.id, METRIC)
            return
        best = min(pool, key=lambda e: e["value"])
        self.ready += [tune_config(unit, "final", c.trial_id, best["search"]) for c in unit.configs]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class SweepScheduler(FIFOScheduler):
    """Starts the costliest waiting trial first; ASHA within each search group's samples (a
    sample competes with its own group only), FIFO for grid and final trials."""

    def __init__(self, spec: SweepSpec):
        super().__init__()
        asha = spec.search.asha if spec.search is not None else None
        # max_t past the budget: ASHA stops a trial that reaches max_t, before it reports its record
        self.asha_args: dict[str, Any] | None = (
            None
            if asha is None
            else dict(
                time_attr=TIME_ATTR[spec.budget.kind],
                max_t=2 * spec.budget.amount,
                grace_period=asha.grace_period,
                reduction_factor=asha.reduction_factor,
                metric=METRIC,
                mode=MODE,
            )
        )
        self.asha: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _for(self, trial) -> AsyncHyperBandScheduler | None:
        if self.asha_args is None or trial.config.get("phase") != "search":
            return None
        from ray.tune.schedulers import ASHAScheduler

        unit = trial.config["unit"]
        if unit not in self.asha:
            self.asha[unit] = ASHAScheduler(**self.asha_args)
        return self.asha[unit]

    def on_trial_add(self, tune_controller, trial):
        if (asha := self._for(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(INTERRUPTED):  # Tune's pause registers the checkpoint it carries; restored, it resumes
            return TrialScheduler.PAUSE
        asha = self._for(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        # Tune marks the result of a STOP decision done=True: a trial's last result says ASHA stopped it
        decision = asha.on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            log.info("ASHA stops %s at step %s", trial, result.get("step"))
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        if (asha := self._for(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        if (asha := self._for(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        if stopping.requested():  # the sweep is stopping: waiting trials stay waiting, in the saved state
            return None
        for status in (Trial.PENDING, Trial.PAUSED):
            waiting = [t for t in tune_controller.get_trials() if t.status == status]
            if waiting:
                return max(waiting, key=lambda t: t.config.get("cost", [0.0]))
        return None

    def debug_string(self) -> str:
        return f"flowbench: longest first, ASHA per search group ({len(self.asha)} groups)"
