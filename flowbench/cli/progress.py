"""What a running sweep tells its user: an opening line (trials, budget, slots, an estimate of the
time), one live bar (trials done, budget spent in the budget's own unit, time left) and, at the end,
the headline of its table."""

from __future__ import annotations

import math
import os
import re
import sys
import time

import pandas as pd
from ray import tune

from flowbench.sweep.plan import SweepPlan
from flowbench.sweep.records import RecordStore
from flowbench.sweep.spec import TIME_ATTR

# what the sweep writes to stderr as it goes (its opening line, a finished trial's line in a log): what a
# reader of its output looking for its one error line passes over
PROGRESS_LINE = re.compile(r"^sweep \S+: \d+ trials \(|^\[\d+/\d+ trials, ")
ESTIMATE_STEPS = 2  # timed training steps of each distinct model for the opening estimate, after one
# this process's live displays by id: what a Tune callback reaches (it holds a key: Tune pickles callbacks)
_LIVE: dict[int, SweepProgress] = {}


def planned_trials(planned: SweepPlan) -> int:
    """Every trial the sweep runs: a grid unit's, a search group's samples and its finals."""
    search = planned.spec.search
    return sum(len(u.configs) + (search.num_samples if u.search and search else 0) for u in planned.units)


def recorded_trials(planned: SweepPlan, out) -> set[str]:
    """The trials of units already recorded at their current configuration (not run again)."""
    store = RecordStore(out)
    return {t["row"]["trial_id"] for u in planned.units for t in store.load(u) or []}


def local_slots(planned: SweepPlan, num_cpus: int | None) -> int:
    """How many trials a local Ray runs at once (what ``cluster_slots`` will find, without Ray)."""
    resources = planned.spec.resources
    cpus = num_cpus or os.cpu_count() or 1
    return max(1, int(cpus // max(1, resources.cpu * resources.workers)))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def opening_line(planned: SweepPlan, total: int, recorded: set[str], slots: int | None) -> str:
    """Trials (models × data sets × seeds), budget, slots, and an estimate of the time: the plan's
    training FLOPs and evaluations at the rate a few steps of each model reach on this machine
    (at the trials' threads, in this process's numerics: a portable sweep runs slower)."""
    import torch

    from flowbench.sweep.cost import cost_of

    spec = planned.spec
    left = [c for c in planned.configs if c.trial_id not in recorded]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # a trial's threads: its whole CPUs
    try:
        cost = cost_of(spec, left, planned.infos, measure_steps=ESTIMATE_STEPS) if left and slots else None
    finally:
        torch.set_num_threads(threads)
    shape = f"{len(spec.models)} models × {len(spec.datasets)} data sets × {len(spec.seeds)} seeds"
    if spec.search:
        shape += f", {spec.search.num_samples} search samples per group"
    line = f"sweep {spec.name}: {total} trials ({shape}), budget {spec.budget.amount:g} {spec.budget.kind} each"
    line += f", {slots} slots" if slots else ", the cluster's slots"
    if recorded:
        line += f"; {len(recorded)} recorded already"
    if cost is not None and slots:
        flops = cost.total("train_flops")
        estimate = cost.total("seconds_here") / slots
        searched = ", search samples not counted" if spec.search else ""
        line += f"; {flops:.3g} training FLOPs to run" if math.isfinite(flops) else ""
        line += f", about {_duration(estimate)} here (a few steps of each model timed now{searched})"
    return line


class SweepProgress:
    """A Tune callback drawing the sweep's one live bar: the budget spent of the total in the budget's
    own unit (FLOPs, steps, …: so its rate and time left are the sweep's), trials done of the total and
    the best validation bits/dim so far. On a terminal one line redrawn; in a log (no terminal) one
    line per finished trial instead."""

    def __init__(self, planned: SweepPlan, total: int, recorded: int):
        from tqdm import tqdm

        spec = planned.spec
        self.amount, self.key = spec.budget.amount, TIME_ATTR[spec.budget.kind]
        self.total, self.done = total, recorded
        self.best: tuple[float, str] | None = None  # the lowest validation bits/dim so far, and whose
        self.recorded_budget = recorded * spec.budget.amount  # spent in earlier runs
        self.spent: dict[str, float] = {}
        self.finished: set[str] = set()
        self.started = time.monotonic()
        self.bar = tqdm(
            total=total * self.amount,
            initial=recorded * self.amount,
            desc=f"sweep {spec.name}",
            unit=f" {spec.budget.kind}",
            unit_scale=True,
            smoothing=0,  # the rate since the start: budget units a second over every slot
            file=sys.stderr,
            disable=None,  # a terminal's: in a log, the lines of ``_log`` instead
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]",
        )
        self._postfix()
        _LIVE[id(self)] = self
        self.callback = SweepCallback(id(self))

    def result(self, trial_id: str, result: dict) -> None:
        spent = result.get(self.key)
        if isinstance(spent, (int, float)) and math.isfinite(spent):
            self.spent[trial_id] = min(float(spent), self.amount)  # the last step may pass the budget
        bpd = result.get("val_bpd")
        if isinstance(bpd, float) and math.isfinite(bpd) and (self.best is None or bpd < self.best[0]):
            self.best = (bpd, trial_id)
        self._draw()

    def end(self, trial_id: str, result: dict, failed: bool) -> None:
        if trial_id in self.finished:
            return
        self.finished.add(trial_id)
        self.result(trial_id, result)
        self.done += 1
        # a trial ended before its budget (a stopped search sample, a diverged trial): what it did not
        # spend leaves the total, so the bar ends full and the time left counts only what will run
        self.bar.total -= self.amount - self.spent.get(trial_id, 0.0)
        self._draw()
        if self.bar.disable:
            status = result.get("status", "failed" if failed else "stopped")
            self._log(f"{trial_id} {status}")

    def _postfix(self) -> None:
        best = f", best val {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        self.bar.set_postfix_str(f"{self.done}/{self.total} trials{best}", refresh=False)

    def _draw(self) -> None:
        self._postfix()
        self.bar.n = self.recorded_budget + sum(self.spent.values())
        self.bar.refresh()

    def _log(self, what: str) -> None:
        spent, total = self.bar.n, self.bar.total
        elapsed = time.monotonic() - self.started
        rate = (spent - self.recorded_budget) / elapsed if elapsed > 0 else 0.0
        left = (total - spent) / rate if rate > 0 else math.inf
        best = f"; best val {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        where = f"{self.done}/{self.total} trials, {spent / total:.0%} of the budget, {_duration(left)} left"
        print(f"[{where}] {what}{best}", file=sys.stderr, flush=True)

    def close(self) -> None:
        _LIVE.pop(id(self), None)
        self.bar.close()


class SweepCallback(tune.Callback):
    """Feeds the display ``key`` names in this process. A top-level class holding a key: Tune pickles
    its callbacks into tuner.pkl, and cloudpickle would take a class made in a function by value, with
    the globals its methods read (``_LIVE``, hence the bar and its stream)."""

    def __init__(self, key: int):
        self.key = key

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (progress := _LIVE.get(self.key)) is not None:
            progress.result(trial.config.get("trial_id", str(trial)), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (progress := _LIVE.get(self.key)) is not None:
            progress.end(trial.config.get("trial_id", str(trial)), trial.last_result or {}, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (progress := _LIVE.get(self.key)) is not None:
            progress.end(trial.config.get("trial_id", str(trial)), trial.last_result or {}, failed=True)


def headline(trials: pd.DataFrame) -> list[str]:
    """Per data set, the model with the lowest mean test bits/dim over its ok trials' seeds, and by
    how much it leads the next (the report's intervals and tests say whether that lead holds)."""
    ok = trials[(trials["status"] == "ok") & (trials["phase"] == "final")]
    lines = []
    for dataset, part in ok.groupby("dataset", sort=False):
        label = part["model"] + part["variant"].map(lambda v: f" ({v})" if v else "")
        means = part.groupby(label)["test_bpd"].agg(["mean", "count"]).sort_values("mean")
        first = means.iloc[0]
        line = f"{dataset}: {means.index[0]} first, {first['mean']:.3f} test bits/dim ({int(first['count'])} seeds)"
        if len(means) > 1:
            second = means.iloc[1]
            line += f", {second['mean'] - first['mean']:.3f} ahead of {means.index[1]} ({second['mean']:.3f})"
        lines.append(line)
    return lines
