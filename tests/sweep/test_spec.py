"""Each class of bad spec: one clear line naming file, line and key; exit 2; nothing written."""

import textwrap
from pathlib import Path

import pytest

from flowbench.cli import main
from flowbench.sweep.plan import match_width, plan
from flowbench.sweep.spec import load_sweep_spec

SWEEPS = Path(__file__).parents[2] / "sweeps"

GOOD = """\
name: t
models: [glow, nxn_shift]
datasets: [digits]
seeds: [0, 1]
budget: {steps: 20}
train: {batch_size: 32}
overrides:
  glow: {depth: 2, levels: 2, hidden_channels: 8}
  nxn_shift: {depth: 2, levels: 2, hidden_channels: 8, lr: 3.0e-4}
"""


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_spec_expands_one_trial_per_model_dataset_seed(tmp_path):
    spec, configs = plan(write(tmp_path, GOOD))
    assert [c.trial_id for c in configs] == [
        "glow-digits-seed0",
        "glow-digits-seed1",
        "nxn_shift-digits-seed0",
        "nxn_shift-digits-seed1",
    ]
    assert configs[0].hparams == dict(depth=2, levels=2, hidden_channels=8) and configs[0].lr == 1e-3
    assert configs[2].lr == 3e-4 and "lr" not in configs[2].hparams  # a train key overridden per model
    assert configs[0].budget_kind == "steps" and configs[0].budget == 20


def test_train_compile_reaches_every_trial_and_leaves_its_identity(tmp_path):
    _, eager = plan(write(tmp_path, GOOD))
    compiling = GOOD.replace("train: {batch_size: 32}", "train: {batch_size: 32, compile: true}")
    _, compiled = plan(write(tmp_path, compiling))
    assert all(c.compile for c in compiled) and not any(c.compile for c in eager)
    # how a trial runs, like its device: a sweep switched to compiling re-runs nothing
    assert [c.config_hash() for c in compiled] == [c.config_hash() for c in eager]


def test_dry_run_lists_trials(tmp_path, capsys):
    assert main(["sweep", str(write(tmp_path, GOOD)), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "4 trials" in out and "nxn_shift-digits-seed1" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: t\nmodels: [glow\n", r"spec.yaml:\d+: malformed YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (GOOD + "colour: blue\n", r"spec.yaml:10: colour: unknown key \(allowed: name, models"),
        (
            GOOD.replace("[glow, nxn_shift]", "[glow, nxn_shfit]"),
            r"spec.yaml:2: models.1: unknown model 'nxn_shfit': did you mean 'nxn_shift'",
        ),
        (
            GOOD.replace("[digits]", "[cifar-10]"),
            r"spec.yaml:3: datasets.0: unknown data set 'cifar-10': did you mean 'cifar10'",
        ),
        (GOOD.replace("{steps: 20}", "{steps: 20, seconds: 5}"), r"spec.yaml:5: budget: give exactly one of"),
        (GOOD.replace("{steps: 20}", "{steps: 0}"), r"spec.yaml:5: budget.steps: Input should be greater than 0"),
        (
            GOOD.replace("{steps: 20}", "{weeks: 2}"),
            r"budget.weeks: unknown key \(allowed: steps, epochs, seconds, images, flops\)",
        ),
        (
            GOOD.replace("depth: 2, levels: 2, hidden_channels: 8}\n  nxn", "depth: 2, widht: 3}\n  nxn"),
            r"spec.yaml:8: overrides.glow.widht: unknown key \['widht'\]",
        ),
        (
            GOOD + "search: {num_samples: 2, space: {lr: {loguniform: [1.0e-2, 1.0e-4]}}}\n",
            r"spec.yaml:10: search.space.lr.loguniform: loguniform takes \[low, high\] with low < high",
        ),
        (
            GOOD + "search: {num_samples: 2, space: {lr: {uniform: [1.0e-4, 1.0e-2]}}, asha: {grace_period: 50}}\n",
            r"spec.yaml:10: search.asha.grace_period: 50 must be below the budget \(20 steps\)",
        ),
        (
            GOOD + "search: {num_samples: 2, space: {momentum: {uniform: [0, 1]}}}\n",
            r"spec.yaml:10: search.space.momentum: neither a train key",
        ),
        (GOOD.replace("seeds: [0, 1]", "seeds: [0, 0]"), r"spec.yaml:4: seeds: an entry of seeds is listed twice"),
        (GOOD.replace("[digits]", "[cifar10]"), r"datasets: cifar10 needs data_roots.cifar10"),
        (
            GOOD.replace("[digits]", "[cifar10]") + "data_roots: {cifar10: /nowhere/cifar}\n",
            r"datasets: data set not found at /nowhere/cifar: expected cifar-10-batches-py",
        ),
        (
            GOOD.replace("levels: 2, hidden_channels: 8}\n  nxn", "levels: 5, hidden_channels: 8}\n  nxn"),
            r"cannot build 'glow' for images \(1, 8, 8\)",
        ),
        (GOOD + "resources: {cpu: 1, gpu: 1}\n", r"each trial asks 1 GPU in all, this machine's Ray has 0"),
    ],
    ids=[
        "yaml",
        "not-a-mapping",
        "unknown-key",
        "unknown-model",
        "unknown-dataset",
        "two-budgets",
        "zero-budget",
        "budget-kind",
        "unknown-hparam",
        "bad-range",
        "grace-over-budget",
        "unknown-search-key",
        "dup-seed",
        "no-data-root",
        "missing-data",
        "levels-too-deep",
        "gpu-on-cpu",
    ],
)
def test_bad_spec_is_one_clear_line_and_writes_nothing(tmp_path, capsys, text, message):
    import re

    path = write(tmp_path, text)
    # resources are checked against the running Ray, data sets by the run itself (a dry run plans a
    # missing one from its published shape: test_plan.py)
    runs = message.startswith(("each trial asks", "datasets: "))
    argv = ["sweep", str(path), "--results", str(tmp_path / "r")] + ([] if runs else ["--dry-run"])
    if message.startswith("each trial asks"):
        pytest.importorskip("ray")
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("flowbench: error: ")
    assert re.search(message, err), err
    if not message.startswith("each trial asks"):
        assert not (tmp_path / "r").exists()


def test_a_trimmed_spec_warns_of_overrides_it_no_longer_uses_and_plans_as_without_them(tmp_path, caplog):
    trimmed = GOOD.replace("[glow, nxn_shift]", "[glow]") + "data_roots: {cifar10: /nowhere}\n"
    with caplog.at_level("WARNING"):
        _, configs = plan(write(tmp_path, trimmed))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert warnings[0].endswith(
        "spec.yaml:9: overrides.nxn_shift: nxn_shift is not one of the sweep's models ['glow']: ignored"
    )
    assert "spec.yaml:10: data_roots.cifar10: cifar10 is not one of the sweep's data sets ['digits']" in warnings[1]
    _, plain = plan(write(tmp_path, GOOD.replace("[glow, nxn_shift]", "[glow]").replace("  nxn_shift: {d", "  # {d")))
    assert [c.config_hash() for c in configs] == [c.config_hash() for c in plain]  # the dropped keys change nothing


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            ("  nxn_shift:", "  nxn_shfit:"),
            r"spec.yaml:9: overrides.nxn_shfit: unknown model 'nxn_shfit': did you mean",
        ),
        (("train:", "data_roots: {cifar-10: /x}\ntrain:"), r"spec.yaml:6: data_roots.cifar-10: unknown data set"),
    ],
    ids=["model", "dataset"],
)
def test_a_misspelt_name_in_overrides_or_data_roots_is_still_refused(tmp_path, capsys, edit, message):
    import re

    rc = main(["sweep", str(write(tmp_path, GOOD.replace(*edit))), "--dry-run", "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err


def test_match_params_scales_width_to_the_target():
    hparams = match_width("glow", (3, 32, 32), dict(depth=4, levels=3), 2_000_000)
    import flowbench

    count = flowbench.build_model("glow", (3, 32, 32), **hparams).num_parameters()
    wider = flowbench.build_model(
        "glow", (3, 32, 32), **(hparams | {"hidden_channels": hparams["hidden_channels"] + 1})
    )
    narrower = flowbench.build_model(
        "glow", (3, 32, 32), **(hparams | {"hidden_channels": hparams["hidden_channels"] - 1})
    )
    assert abs(count - 2e6) <= min(abs(wider.num_parameters() - 2e6), abs(narrower.num_parameters() - 2e6))
    assert abs(count - 2e6) / 2e6 < 0.01


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path):
    import math

    from flowbench.flows.registry import model_entry

    spec = load_sweep_spec(path)
    if not spec.data_roots:  # the ones on embedded data expand into trials here too
        # each model runs every combination of the grid values of the hyperparameters it has
        variants = sum(
            math.prod(len(v) for k, v in spec.grid.items() if k in model_entry(m).hparams()) for m in spec.models
        )
        assert len(plan(path)[1]) == variants * len(spec.datasets) * len(spec.seeds)
