"""The trial record: one flat row per trial, each column declared once, here.

``trials.parquet``'s columns, what MLflow logs of a trial and how a table is rebuilt from MLflow
(``flowbench report --mlflow-uri``) all follow from ``TrialRecord``'s fields. A field's
``mlflow`` metadata says how MLflow holds it:

- ``param``: what was asked (identity, budget, recipe), logged once when the run starts;
- ``metric``: what was measured, logged as ``final_<name>`` when the trial ends;
- ``tag``: status, reason and provenance (where and with what it ran).

The type annotation is the column's type: the read-back from MLflow, where every param and tag is
text and every metric a float, converts each value back with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from typing import Any

PARAM, METRIC, TAG = "param", "metric", "tag"
FINAL_PREFIX = "final_"  # a trial's final figures are MLflow metrics final_<column>


def column(default: Any = dataclasses.MISSING, *, mlflow: str, factory: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, default_factory=factory, metadata={"mlflow": mlflow})


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class TrialRecord:
    """One flat row per trial. ``curve`` (the evaluations) is not a column: it goes to
    ``curves.parquet`` in long format and to MLflow's metric histories."""

    # identity: what ran
    sweep: str = column(mlflow=PARAM)
    trial_id: str = column(mlflow=PARAM)
    model: str = column(mlflow=PARAM)
    dataset: str = column(mlflow=PARAM)
    seed: int = column(mlflow=PARAM)
    config_hash: str = column(mlflow=TAG)  # hash of the fully expanded configuration
    variant: str = column("", mlflow=PARAM)  # an ablation's setting, e.g. "actnorm=false"; "" for the card's model
    hparams: str = column("{}", mlflow=PARAM)  # JSON: the architecture actually built
    recipe: str = column("{}", mlflow=PARAM)  # JSON: the training recipe actually used, with its source
    # budget and what was spent
    budget_kind: str = column("steps", mlflow=PARAM)
    budget: float = column(0.0, mlflow=PARAM)
    batch_size: int = column(0, mlflow=PARAM)
    lr: float = column(0.0, mlflow=PARAM)
    evaluations: int = column(0, mlflow=PARAM)  # on validation along the budget, the k-th at k/N of it
    steps: int = column(0, mlflow=METRIC)
    epochs: float = column(0.0, mlflow=METRIC)
    images_seen: int = column(0, mlflow=METRIC)
    train_seconds: float = column(0.0, mlflow=METRIC)
    wall_seconds: float = column(0.0, mlflow=METRIC)
    compile_seconds: float = column(0.0, mlflow=METRIC)  # torch.compile (train: compile); not in train_seconds
    flops_per_image: float = column(math.nan, mlflow=METRIC)  # training (forward + backward), measured
    train_flops: float = column(0.0, mlflow=METRIC)  # spent: flops_per_image × images_seen
    # results: selection uses val_bpd; test_bpd is computed once, on the selected checkpoint
    val_bpd: float = column(math.nan, mlflow=METRIC)
    test_bpd: float = column(math.nan, mlflow=METRIC)
    train_bpd: float = column(
        math.nan, mlflow=METRIC
    )  # mean of the last evaluation interval; last finite loss if diverged
    eval_images: int = column(0, mlflow=METRIC)  # validation images each evaluation along the budget used
    selected_step: int = column(0, mlflow=METRIC)  # the step of the checkpoint test_bpd was computed on
    num_params: int = column(0, mlflow=METRIC)  # effective: what can change the map
    num_params_allocated: int = column(0, mlflow=METRIC)  # every allocated entry, masked ones included
    throughput_images_per_s: float = column(math.nan, mlflow=METRIC)
    peak_memory_mb: float = column(math.nan, mlflow=METRIC)
    # status and provenance
    status: str = column("ok", mlflow=TAG)  # ok | diverged | failed | stopped
    reason: str = column("", mlflow=TAG)
    phase: str = column("final", mlflow=TAG)  # search samples are not Table 2's trials
    workers: int = column(1, mlflow=TAG)  # data-parallel processes
    memory_kind: str = column("", mlflow=TAG)
    device: str = column("", mlflow=TAG)
    # what the numbers depend on (flowbench.numerics): equal bits need these equal, or numerics portable
    numerics: str = column("native", mlflow=TAG)
    cpu: str = column("", mlflow=TAG)  # model name and the instruction sets that pick kernels
    cpu_capability: str = column("", mlflow=TAG)  # ATen's kernels: DEFAULT, AVX2, AVX512
    threads: int = column(0, mlflow=TAG)  # intra-op threads (reductions split by them)
    math_libraries: str = column("", mlflow=TAG)  # MKL and oneDNN versions
    gpu: str = column("", mlflow=TAG)  # name, CUDA and cuDNN versions where a GPU ran it
    node: str = column(factory=platform.node, mlflow=TAG)  # the Ray node (or host) the trial ran on
    hostname: str = column(factory=platform.node, mlflow=TAG)
    torch_version: str = column(factory=lambda: _version("torch"), mlflow=TAG)
    flowbench_version: str = column(factory=lambda: _version("flowbench"), mlflow=TAG)
    git_commit: str = column("", mlflow=TAG)
    finished_at: str = column("", mlflow=TAG)
    curve: list = dataclasses.field(default_factory=list, repr=False, metadata={"mlflow": None})

    def row(self) -> dict:
        """The flat Parquet row (the curve goes to curves.parquet in long format)."""
        row = dataclasses.asdict(self)
        del row["curve"]
        return row


_FIELDS = [f for f in dataclasses.fields(TrialRecord) if f.metadata["mlflow"] is not None]
RECORD_COLUMNS: list[str] = [f.name for f in _FIELDS]
COLUMN_TYPES: dict[str, type] = {f.name: {"str": str, "int": int, "float": float}[str(f.type)] for f in _FIELDS}


def columns(kind: str) -> list[str]:
    """The columns MLflow holds as ``kind`` (PARAM, METRIC or TAG)."""
    return [f.name for f in _FIELDS if f.metadata["mlflow"] == kind]


def convert(name: str, value: Any) -> Any:
    """A value read back from MLflow (text for params and tags, float for metrics) as its column's type."""
    kind = COLUMN_TYPES[name]
    if kind is str:
        return str(value)
    if isinstance(value, str):
        value = json.loads(value) if value not in ("nan", "inf", "-inf") else float(value)
    return int(value) if kind is int else float(value)


def row_from_mlflow(params: dict, metrics: dict, tags: dict) -> dict:
    """The trials.parquet row of one MLflow trial run, every column present and typed."""
    defaults = TrialRecord(sweep="", trial_id="", model="", dataset="", seed=0, config_hash="").row()
    found = (
        {k: params[k] for k in columns(PARAM) if k in params}
        | {k: metrics[FINAL_PREFIX + k] for k in columns(METRIC) if FINAL_PREFIX + k in metrics}
        | {k: tags[k] for k in columns(TAG) if k in tags}
    )
    return {name: convert(name, found[name]) if name in found else defaults[name] for name in RECORD_COLUMNS}
