"""Checkpoints: written whole or not at all, read safely, and the model a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import torch

import flowbench
from flowbench.atomic import atomic_write
from flowbench.errors import FlowbenchError
from flowbench.flows.models import FlowModel

CHECKPOINT_FILE = "checkpoint.pt"  # the latest state: what a resumed trial continues from
SELECTED_FILE = "selected.pt"  # the weights with the best validation bits/dim: what the trial reports


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path) as tmp:  # a crash never leaves a half-written checkpoint
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A trial's checkpoint (its latest state) or selected weights; a folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FlowbenchError(f"{path}: no checkpoint there; give a trial's checkpoint.pt or its folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, …: torch raises many types
        raise FlowbenchError(
            f"{path}: corrupted or not a flowbench checkpoint ({type(err).__name__}); delete it to start the trial over"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise FlowbenchError(f"{path}: not a flowbench checkpoint (no model/config); delete it to start over")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> FlowModel:
    """The model a checkpoint holds, with every preprocessing choice (n_bits, …) it was trained with."""
    config = state["config"]
    model = flowbench.build_model(config["model"], state["image_shape"], **state.get("hparams", config["hparams"]))
    model.load_state_dict(state["model"])
    return model.to(device)
