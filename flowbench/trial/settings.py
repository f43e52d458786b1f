"""A trial's settings and identity: what it trains, on what budget and data, where; its hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import ClassVar, Literal

import pydantic
import torch

from flowbench.errors import FlowbenchError
from flowbench.numerics import Numerics
from flowbench.record import TrialRecord
from flowbench.specfile import FieldError

# bump when a change makes earlier trials' results incomparable (part of every trial's identity)
IDENTITY_VERSION = 2
BudgetKind = Literal["steps", "epochs", "seconds", "images", "flops"]
CouplingPrecision = Literal["float32", "bfloat16"]
Optimizer = Literal["adam", "adamax"]


class TrainSettings(pydantic.BaseModel):
    """How a trial trains: the part of its config that a sweep spec's ``train:`` sets for all.
    A model card's recipe (``models/<name>.yaml``) supplies these per data set; what a spec or
    the CLI sets explicitly overrides the card."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    optimizer: Optimizer = "adam"
    batch_size: int = pydantic.Field(64, gt=0)
    lr: float = pydantic.Field(1e-3, gt=0)
    warmup_steps: int = pydantic.Field(0, ge=0)
    grad_clip: float | None = pydantic.Field(50.0, gt=0)  # max gradient norm; None: no clipping
    memory_saving: bool = False  # gradient checkpointing per flow step: less memory, more compute
    coupling_precision: CouplingPrecision = "float32"  # the coupling networks' compute
    # torch.compile the training step's forward and backward; how a trial runs, not what it is
    # (like its device): not part of its identity, so a checkpoint resumes compiled or eager
    compile: bool = False
    # evaluations along the budget, the k-th once k/N of it is spent (in the budget's own unit: at
    # equal training FLOPs for every model under a FLOPs budget); a checkpoint is written at each
    evaluations: int = pydantic.Field(10, gt=0)
    eval_images: int | None = pydantic.Field(None, gt=0)  # validation images per evaluation (None: all)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_step_intervals(cls, data):
        # the settings of flowbench before evaluations were placed along the budget
        old = [k for k in ("eval_every", "checkpoint_every") if isinstance(data, dict) and k in data]
        if old:
            raise FieldError(
                (old[0],),
                "evaluations are placed along the budget now: give evaluations: N (the k-th at k/N of the "
                "budget, a checkpoint at each) instead of eval_every and checkpoint_every",
            )
        return data


class TrialConfig(TrainSettings):
    """Everything that defines a trial; all but the fields in ``NOT_IDENTITY`` feed ``config_hash``."""

    NOT_IDENTITY: ClassVar[frozenset] = frozenset(
        {"recipe_source", "data_root", "device", "compile", "out_dir", "sweep", "trial_id"}
    )

    model: str
    dataset: str
    hparams: dict = {}
    variant: str = ""  # an ablation's setting (spec grid:), e.g. "actnorm=false"
    seed: int = pydantic.Field(0, ge=0)
    budget_kind: BudgetKind = "steps"
    budget: float = pydantic.Field(500, gt=0)
    numerics: Numerics = "native"  # "portable": the same bits on every x86-64 CPU with AVX2 (flowbench.numerics)
    data_fingerprint: str = ""  # the data set's split sizes (and source checksum), set by whoever plans the trial
    recipe_source: str = ""  # where the training settings come from (card recipe, spec, CLI): provenance only
    # where and on what it runs: not part of the trial's identity
    data_root: str | None = None
    device: str = "auto"
    out_dir: str = "runs/trial"
    sweep: str = ""
    trial_id: str = ""

    def config_hash(self) -> str:
        identity = self.model_dump(exclude=set(self.NOT_IDENTITY)) | {"identity_version": IDENTITY_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

    def record(self, hparams: dict | None = None, **measured) -> TrialRecord:
        """A record of this trial: its identity and budget from the config (``hparams`` as built,
        when known), ``measured`` for the rest."""
        hparams = self.hparams if hparams is None else hparams
        recipe = self.recipe() | ({"n_bits": hparams["n_bits"]} if "n_bits" in hparams else {})
        return TrialRecord(
            sweep=self.sweep,
            trial_id=self.trial_id,
            model=self.model,
            dataset=self.dataset,
            seed=self.seed,
            config_hash=self.config_hash(),
            variant=self.variant,
            hparams=json.dumps(hparams, sort_keys=True),
            recipe=json.dumps(recipe, sort_keys=True),
            budget_kind=self.budget_kind,
            budget=self.budget,
            batch_size=self.batch_size,
            lr=self.lr,
            evaluations=self.evaluations,
            **measured,
        )

    def recipe(self) -> dict:
        """The training settings actually used and where they come from (with the model's n_bits,
        the record's ``recipe`` column)."""
        return self.model_dump(include={"optimizer", "lr", "warmup_steps", "batch_size", "grad_clip"}) | {
            "source": self.recipe_source
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlowbenchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowbenchError(f"device {name!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel trial: rank ``rank`` of ``world`` processes.

    Every process draws the same global batch and the same dequantisation noise, then keeps
    every ``world``-th image from ``rank`` on: together they compute what one process would.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank :: self.world] if self.world > 1 else x

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world == 1:
            return values
        on_gpu = torch.distributed.get_backend() == "nccl"  # nccl reduces only CUDA tensors
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
        torch.distributed.all_reduce(
            t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        )
        return t.tolist()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
