"""What a sweep keeps of its trials: a record per Tune trial (the ``trials.parquet`` row and
its curve), the finished units' records under ``results/NAME/records/``, and the archive
where records of units whose configuration changed go.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flowbench.atomic import atomic_write
from flowbench.record import RECORD_COLUMNS
from flowbench.results.tables import CURVE_METRICS
from flowbench.sweep.latency import weights_file
from flowbench.sweep.plan import Unit, trial_of
from flowbench.sweep.search import METRIC
from flowbench.sweep.storage import copy_from_checkpoint, read_from_checkpoint, tune_storage
from flowbench.sweep.worker import CURVE_FILE, RECORD_FILE
from flowbench.trial.checkpoints import CHECKPOINT_FILE, SELECTED_FILE

FIGURES = ("samples", "reconstructions")


# --------------------------------------------------------------------------- records
def error_reason(error: BaseException) -> str:
    """A failed trial's reason: the last line of its error (the exception raised in the trial)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _evaluations(checkpoint) -> list[dict]:
    """The trial's evaluations that its checkpoint carries (``CURVE_FILE``), as reported."""
    text = read_from_checkpoint(checkpoint, CURVE_FILE) if checkpoint is not None else None
    return [json.loads(line) for line in (text or "").splitlines()]


def record_of(
    tune_config: dict, last: dict, error: BaseException | None, checkpoint, units: dict[str, Unit]
) -> dict | None:
    """The trials.parquet row of a Tune trial from its config (its unit among ``units``), last result
    and latest checkpoint; MLflow logs the same. A finished trial's checkpoint holds its record; a
    failed trial and a search sample that ASHA stopped get a row too, from the last evaluation their
    checkpoint holds.

    None for a trial that has not finished: never started, or interrupted because the sweep was
    stopped (Tune's saved state keeps it running, and it resumes from its latest checkpoint).
    ASHA's decision is in the last result: Tune marks the result a scheduler stopped a trial at
    ``done`` (a finished trial's record too), and only ASHA stops trials here, search samples only.
    Reading the checkpoint raises OSError when Tune's storage does not answer.
    """
    stopped = error is None and bool(last.get("done")) and tune_config["phase"] == "search"
    recorded = read_from_checkpoint(checkpoint, RECORD_FILE) if checkpoint is not None and error is None else None
    if recorded is not None:
        stored = json.loads(recorded)
        row = {k: stored[k] for k in RECORD_COLUMNS}
    elif error is None and not stopped:
        return None
    else:
        status, reason = ("failed", error_reason(error)) if error is not None else ("stopped", "stopped early by ASHA")
        record = trial_of(tune_config, units[tune_config["unit"]]).record(
            status=status,
            reason=reason,
            node=last.get("node", ""),
        )
        evaluations = _evaluations(checkpoint)
        if evaluations:  # the last evaluation: how far the trial got
            point = evaluations[-1]
            record.steps, record.images_seen, record.epochs = (
                int(point["step"]),
                int(point["images_seen"]),
                point["epochs"],
            )
            record.train_seconds, record.train_flops = point["train_seconds"], point.get("train_flops", 0.0)
            record.val_bpd, record.train_bpd = point[METRIC], point["train_bpd"]
        row = record.row()
    # Tune stamps its own trial_id on every result: ours comes from the config
    return row | {"trial_id": tune_config["trial_id"], "phase": tune_config["phase"]}


def curve_of(checkpoint) -> list[dict]:
    """The evaluations (``CURVE_METRICS`` by step) that a trial's checkpoint carries; of a step
    evaluated twice (a trial resumed from an earlier checkpoint), the later."""
    by_step = {int(point["step"]): point for point in _evaluations(checkpoint)}
    return [
        {"step": step, **{k: point[k] for k in CURVE_METRICS if k in point}} for step, point in sorted(by_step.items())
    ]


class RecordStore:
    """``results/NAME/records/<unit>.json``: a finished unit's rows and curves under its hash.
    A unit is finished when its final trials all ended without failing (ok or diverged)."""

    def __init__(self, out: Path):
        self.out, self.folder = out, out / "records"

    def _path(self, unit_id: str) -> Path:
        return self.folder / f"{unit_id}.json"

    def load(self, unit: Unit) -> list[dict] | None:
        path = self._path(unit.id)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if stored["unit_hash"] != unit.hash:
            return None
        # a final trial recorded "stopped" was interrupted (flowbench 0.1 took any trial that ended
        # without a record for an ASHA stop; ASHA stops search samples only): not finished
        if any(t["row"]["phase"] == "final" and t["row"]["status"] == "stopped" for t in stored["trials"]):
            return None
        return stored["trials"]

    def save(self, unit: Unit, trials: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self._path(unit.id)) as tmp:
            tmp.write_text(json.dumps({"unit_hash": unit.hash, "trials": trials}))

    def stale(self, units: list[Unit]) -> list[Path]:
        """Records of units no longer planned at their stored hash."""
        current = {u.id: u.hash for u in units}
        found = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        return [p for p in found if current.get(p.stem) != json.loads(p.read_text())["unit_hash"]]


def collect(results, units: dict[str, Unit], store: RecordStore, figures: Path, weights: Path) -> dict[str, list[dict]]:
    """Store every unit of ``results`` (a ResultGrid) that finished at its planned hash, with its
    trials' figures and selected weights (``weights/TRIAL.pt``); returns the ended trials of every
    unit found, finished or not (a failed trial is in this run's tables, and runs again next time;
    an unfinished one is in no table)."""
    by_unit: dict[str, list] = {}
    for result in results:
        config: dict = result.config or {}
        unit = units.get(config.get("unit", ""))  # no unit: not a trial of this sweep
        # no trial_id: a config of another layout (``TUNE_CONFIG_LAYOUT``), which ``trial_of`` cannot read
        if unit is not None and config.get("unit_hash") == unit.hash and "trial_id" in config:
            by_unit.setdefault(unit.id, []).append(result)
    found = {}
    for unit_id, unit_results in by_unit.items():
        unit = units[unit_id]
        ended = [
            (row, r)
            for r in unit_results
            if (row := record_of(r.config, r.metrics or {}, r.error, r.checkpoint, units)) is not None
        ]
        trials: list[dict] = [{"row": row, "curve": curve_of(r.checkpoint)} for row, r in ended]
        found[unit_id] = trials
        finals = [
            (t, r)
            for t, (_, r) in zip(trials, ended, strict=True)
            if t["row"]["phase"] == "final" and t["row"]["status"] != "failed"
        ]
        if len(finals) < len(unit.configs):
            continue  # not finished: the unit runs (again)
        for t, r in finals:
            if r.checkpoint is not None:  # the report's sample figures; the latency phase's weights
                trial_id = t["row"]["trial_id"]
                for figure in FIGURES:
                    copy_from_checkpoint(r.checkpoint, f"{figure}.png", figures / f"{figure}-{trial_id}.png")
                selected = weights_file(weights, trial_id)
                if t["row"]["status"] == "ok" and not copy_from_checkpoint(r.checkpoint, SELECTED_FILE, selected):
                    copy_from_checkpoint(r.checkpoint, CHECKPOINT_FILE, selected)
        store.save(unit, trials)
    return found


def archive_stale(out: Path, stamp: str, paths: list[Path], storage: str, experiment: str | None) -> Path:
    """Move stale records, their figures and (local storage) the old Tune experiment under
    ``results/NAME/archive/<stamp>/``; nothing is deleted."""
    archive = out / "archive" / stamp
    for path in paths:
        trial_ids = [t["row"]["trial_id"] for t in json.loads(path.read_text())["trials"]]
        dest = archive / path.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), dest)
        for figure in (out / "figures" / f"{kind}-{trial_id}.png" for trial_id in trial_ids for kind in FIGURES):
            if figure.is_file():
                (archive / "figures").mkdir(parents=True, exist_ok=True)
                shutil.move(str(figure), archive / "figures" / figure.name)
    filesystem, root = tune_storage(storage)
    if experiment is not None and filesystem is None:
        for folder in (Path(root) / experiment, Path(root) / f"{experiment}-train"):
            if folder.exists():
                (archive / "tune").mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), archive / "tune" / folder.name)
    elif experiment is not None:  # remote storage: the experiment stays where it is, named here
        archive.mkdir(parents=True, exist_ok=True)
        (archive / "tune-experiment.txt").write_text(f"{storage.rstrip('/')}/{experiment}\n")
    return archive
