"""The cost of a sweep before it runs: FLOPs from the counter at each trial's shape, steps and images as the
trial walks them, GPU-hours at a stated fraction of a datasheet peak; no data set needed."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flowbench.cards import load_card
from flowbench.cli import main
from flowbench.flows.actnorm import ActNorm
from flowbench.flows.registry import build_model
from flowbench.sweep.cost import ACCELERATORS, DEFAULT_MFU, plan_cost
from flowbench.sweep.plan import expand
from flowbench.sweep.spec import load_sweep_spec
from flowbench.trial import run_trial

SPECS = Path(__file__).parents[2] / "sweeps"
# the paper's data sets as published (ILSVRC-2012's npz: 1,281,167 training images, 50,000 validation)
SIZES = {  # train (less the carved validation), validation, test
    "cifar10": (45_000, 5_000, 10_000),
    "imagenet32": (1_271_167, 10_000, 50_000),
    "imagenet64": (1_271_167, 10_000, 50_000),
}
SHAPES = {"cifar10": (3, 32, 32), "imagenet32": (3, 32, 32), "imagenet64": (3, 64, 64)}


TINY = {"realnvp": {"levels": 2, "n_blocks": 1, "hidden_channels": 8}} | {
    m: {"depth": 2, "levels": 2, "hidden_channels": 8} for m in ("glow", "emerging", "nxn_shift")
}


def counted(model_name, dataset, batch, hparams=None):
    """FLOPs per image of a training step at ``batch``, and of its forward alone, counted here."""
    torch.set_num_threads(1)
    hparams = load_card(model_name).hparams_for(dataset) | (hparams or {})
    model = build_model(model_name, SHAPES[dataset], **hparams)
    for layer in model.modules():
        if isinstance(layer, ActNorm):
            layer.mark_initialized()
    model.to("meta")
    pixels = torch.zeros(batch, *SHAPES[dataset], dtype=torch.uint8, device="meta")
    with FlopCounterMode(display=False) as step:
        with FlopCounterMode(display=False) as forward:
            x, logdet = model.preprocess_pixels(pixels)
            bpd = model.bits_per_dim_of(model.log_prob(x), logdet).mean()
        bpd.backward()
    return step.get_total_flops() / batch, forward.get_total_flops() / batch


@pytest.mark.parametrize(
    "scale",
    [
        # the paper's cards: counting 12 models of up to 44M parameters twice takes minutes of CPU
        pytest.param("paper", marks=pytest.mark.paper_scale),
        "tiny",  # table2.yaml with tiny models: the same plan, data-free, in seconds
    ],
)
def test_the_table2_plan_prints_its_flops_and_gpu_hours_without_any_data(tmp_path, capsys, monkeypatch, scale):
    monkeypatch.setenv("FLOWBENCH_CACHE_DIR", str(tmp_path / "no-cache"))  # nothing prepared either
    assert not Path("/data/cifar10").exists()  # table2.yaml's data roots: not on this machine
    spec = SPECS / "table2.yaml"
    if scale == "tiny":
        spec = tmp_path / "table2.yaml"
        overrides = "".join(f"  {m}: {{{', '.join(f'{k}: {v}' for k, v in h.items())}}}\n" for m, h in TINY.items())
        spec.write_text((SPECS / "table2.yaml").read_text() + "overrides:\n" + overrides)
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cifar10: planned from its published shape 3x32x32 and sizes 45,000 / 5,000 / 10,000" in out
    # table2.yaml: 100,000 steps of 64, 20 evaluations on at most 10,000 validation images, three seeds
    train_total = eval_total = 0.0
    for model in ("realnvp", "glow", "emerging", "nxn_shift"):
        for dataset, (n_train, n_val, n_test) in SIZES.items():
            per_image, forward = counted(model, dataset, 64, TINY[model] if scale == "tiny" else None)
            per_epoch = math.ceil(n_train / 64)  # an epoch ends with what is left of it
            epochs, rest = divmod(100_000, per_epoch)
            images = epochs * n_train + rest * 64
            row = next(line.split() for line in out.splitlines() if line.split()[:1] == [f"{model}-{dataset}-seed1"])
            assert row[1:6] == [f"{per_image:.3g}", "100,000", f"{images:,}", f"{images * per_image:.3g}", row[5]]
            evaluated = 20 * min(10_000, n_val) + n_val + n_test
            assert float(row[5]) == pytest.approx(evaluated * forward, rel=5e-3)
            train_total += 3 * images * per_image
            eval_total += 3 * evaluated * forward
    total = re.search(r"total: (\S+) training FLOPs, (\S+) evaluation FLOPs, (\S+) in all", out)
    assert [float(v) for v in total.groups()] == pytest.approx(
        [train_total, eval_total, train_total + eval_total], rel=5e-3
    )
    assert f"GPU-hours at {DEFAULT_MFU:.0%} of the datasheet's dense peak (an assumption" in out
    for gpu in ACCELERATORS:  # float32 couplings: TF32 tensor cores
        value, unit = re.search(rf"{re.escape(gpu.name)} +([\d,.e+-]+) GPU-(hours|seconds)", out).groups()
        seconds = float(value.replace(",", "")) * (3600 if unit == "hours" else 1)
        expected = (train_total + eval_total) / (gpu.tf32 * 1e12 * DEFAULT_MFU)
        printed = pytest.approx(expected, abs=0.051 * 3600) if unit == "hours" else pytest.approx(expected, rel=5e-3)
        assert seconds == printed
        assert gpu.source.startswith("https://www.nvidia.com/")


def test_the_plan_is_what_the_trial_spends_and_measure_times_it_here(tmp_path, capsys):
    """A FLOPs budget on the digits: the plan's FLOPs per image, steps, images and evaluations are the
    trial's own; --measure times each model here; --mfu sets the fraction."""
    spec = tmp_path / "flops.yaml"
    text = (
        (SPECS / "smoke.yaml")
        .read_text()
        .replace("{steps: 20}", "{flops: 1.0e8}")
        .replace("evaluations: 2", "evaluations: 3")
    )
    spec.write_text(text.replace("seeds: [0, 1]", "seeds: [0]"))
    cost = plan_cost(spec)
    for planned, config in zip(cost.trials, expand(load_sweep_spec(spec), cost.infos), strict=True):
        record = run_trial(config.model_copy(update={"out_dir": str(tmp_path / config.trial_id)}))
        assert planned.flops_per_image == record.flops_per_image
        assert (planned.steps, planned.images) == (record.steps, record.images_seen)
        assert planned.evaluations == len(record.curve) == 3 and planned.eval_images == record.eval_images
        assert planned.train_flops == record.train_flops
    assert main(["sweep", str(spec), "--dry-run", "--measure", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours at 50% of the datasheet's dense peak, at the trials' precision (TF32)" in out
    hours = re.search(r"this machine: ([\d.]+) hours one trial after another", out)
    assert hours and float(hours.group(1)) >= 0 and "hours here" in out
    assert main(["sweep", str(spec), "--measure"]) == 2  # without --dry-run: one line
    assert "--measure and --mfu go with --dry-run" in capsys.readouterr().err
