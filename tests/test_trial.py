"""One trial end to end on the digits data (1×8×8), tiny enough to run in seconds."""

import json
import math

import pytest
import torch

from flowbench import FlowbenchError
from flowbench.trial import CHECKPOINT_FILE, TrialConfig, load_checkpoint, model_from_checkpoint, run_trial

TINY = dict(
    model="glow",
    dataset="digits",
    hparams=dict(depth=2, levels=2, hidden_channels=8),
    batch_size=32,
    evaluations=2,
)


def config(tmp_path, **kw):
    return TrialConfig(**(TINY | dict(out_dir=str(tmp_path)) | kw))


@pytest.mark.parametrize(
    "kind,budget,steps,images",
    # digits: 1,500 training images less the 150 carved off for validation; 1,350 / 32 → 43 steps an epoch
    [("steps", 12, 12, 12 * 32), ("images", 100, 4, 100), ("epochs", 1, 43, 1350)],
)
def test_budget_is_spent_exactly(tmp_path, kind, budget, steps, images):
    record = run_trial(config(tmp_path, budget_kind=kind, budget=budget))
    assert record.status == "ok", record.reason
    assert (record.steps, record.images_seen) == (steps, images)
    if kind == "epochs":
        assert record.epochs == 1.0


def test_seconds_budget_stops_at_the_first_step_past_it(tmp_path):
    record = run_trial(config(tmp_path, budget_kind="seconds", budget=1.0, evaluations=1))
    assert record.status == "ok"
    step_time = record.train_seconds / record.steps
    assert 1.0 <= record.train_seconds < 1.0 + 5 * step_time + 0.5  # overshoot: the last step only
    assert len(record.curve) == 1  # evaluated once, at the end


def test_record_measures_what_it_says(tmp_path):
    record = run_trial(config(tmp_path, budget=10))
    row = record.row()
    assert "curve" not in row
    assert row["num_params"] > 0 and json.loads(row["hparams"])["depth"] == 2
    # selection on validation, test once on the selected weights
    assert 0 < row["test_bpd"] < 16 and 0 < row["val_bpd"] < 16 and row["test_bpd"] != row["val_bpd"]
    best = min(record.curve, key=lambda p: p["val_bpd"])
    assert row["selected_step"] == best["step"] and all("test_bpd" not in p for p in record.curve)
    assert row["flops_per_image"] > 0 and row["train_flops"] == row["flops_per_image"] * row["images_seen"]
    assert json.loads(row["recipe"])["batch_size"] == 32
    assert row["throughput_images_per_s"] == pytest.approx(row["images_seen"] / row["train_seconds"])
    assert row["device"] == "cpu" and row["torch_version"] == torch.__version__
    assert [p["step"] for p in record.curve] == [5, 10]
    assert row["config_hash"] == TrialConfig(**TINY, budget=10, out_dir="elsewhere").config_hash()


def test_training_lowers_validation_bits_per_dim(tmp_path):
    record = run_trial(config(tmp_path, budget=60, evaluations=3))
    curve = [p["val_bpd"] for p in record.curve]
    assert curve[-1] < curve[1] < curve[0] - 0.2, curve


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a = run_trial(config(tmp_path / "a", budget=10))
    b = run_trial(config(tmp_path / "b", budget=10))
    c = run_trial(config(tmp_path / "c", budget=10, seed=1))
    assert without_timings(a.curve) == without_timings(b.curve)
    assert a.test_bpd == b.test_bpd and a.test_bpd != c.test_bpd


def without_timings(curve):
    return [{k: v for k, v in point.items() if k != "train_seconds"} for point in curve]


class Interrupt(Exception):
    pass


def test_resumed_trial_reaches_the_same_result(tmp_path):
    straight = run_trial(config(tmp_path / "straight", budget=30, evaluations=3))

    def crash_after_first_checkpoint(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(config(tmp_path / "resumed", budget=30, evaluations=3), crash_after_first_checkpoint)
    ckpt = tmp_path / "resumed" / "checkpoint" / CHECKPOINT_FILE
    assert load_checkpoint(ckpt)["progress"]["step"] == 10
    resumed = run_trial(config(tmp_path / "resumed", budget=30, evaluations=3), resume_from=ckpt)
    assert resumed.steps == 30 and without_timings(resumed.curve) == without_timings(straight.curve)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint")["model"]
    b = load_checkpoint(ckpt)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resuming_a_trial_already_at_its_budget_trains_nothing_and_keeps_a_checkpoint(tmp_path):
    first = run_trial(config(tmp_path / "first", budget=10))
    again = run_trial(config(tmp_path / "again", budget=10), resume_from=tmp_path / "first" / "checkpoint")
    assert again.steps == 10 and again.status == "ok" and again.test_bpd == first.test_bpd
    state = load_checkpoint(tmp_path / "again" / "checkpoint")
    assert state["progress"]["step"] == 10


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    run_trial(config(tmp_path, budget=10))
    with pytest.raises(FlowbenchError, match="another trial configuration"):
        run_trial(config(tmp_path, budget=10, lr=1e-2), resume_from=tmp_path / "checkpoint")


def test_diverging_trial_is_recorded_not_raised(tmp_path):
    record = run_trial(config(tmp_path, budget=30, lr=1e4, grad_clip=None))
    assert record.status == "diverged"
    assert "loss became nan or inf at step" in record.reason
    assert 0 < record.steps < 30 and math.isfinite(record.train_bpd)


def nan_from_the_first_training_step(monkeypatch):
    """A model whose training loss is NaN from step 1 on (evaluations stay finite)."""
    from flowbench.flows.models import FlowModel

    real = FlowModel.bits_per_dim_of

    def bits_per_dim_of(self, log_prob, logdet):
        bpd = real(self, log_prob, logdet)
        return bpd * math.nan if torch.is_grad_enabled() and self.training else bpd

    monkeypatch.setattr(FlowModel, "bits_per_dim_of", bits_per_dim_of)


def test_divergence_at_step_one_is_a_record_not_a_crash(tmp_path, monkeypatch):
    nan_from_the_first_training_step(monkeypatch)
    record = run_trial(config(tmp_path, budget=30, evaluations=6))
    assert record.status == "diverged" and record.steps == 1
    assert "at step 1 " in record.reason and math.isnan(record.test_bpd)
    assert not (tmp_path / "checkpoint").exists()  # nothing worth resuming was written


def test_cli_train_that_diverges_at_step_one_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    from flowbench.cli import main

    nan_from_the_first_training_step(monkeypatch)
    code = None
    try:
        code = main(
            [
                "train",
                "--model",
                "glow",
                "--dataset",
                "digits",
                "--hparam",
                "depth=1",
                "--hparam",
                "levels=2",
                "--hparam",
                "hidden_channels=8",
                "--budget-steps",
                "10",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "diverged: training loss became nan or inf at step 1 " in err[0]
    row = json.loads((tmp_path / "run" / "record.json").read_text())
    assert row["status"] == "diverged" and row["steps"] == 1


def test_flops_budget_is_met_within_one_step_and_evaluated_at_its_fifths(tmp_path):
    probe = run_trial(config(tmp_path / "probe", budget=1))
    per_step = probe.flops_per_image * 32
    budget = 7.5 * per_step
    record = run_trial(config(tmp_path / "run", budget_kind="flops", budget=budget, evaluations=5))
    assert record.status == "ok" and record.steps == 8
    assert budget <= record.train_flops < budget + per_step
    assert record.flops_per_image == probe.flops_per_image  # measured, and the same at the same shape
    # the k-th evaluation at the first step that has spent k/5 of the budget: 1.5, 3, 4.5, 6, 7.5 steps' FLOPs
    assert [p["step"] for p in record.curve] == [2, 3, 5, 6, 8]
    assert [p["milestone"] for p in record.curve] == [1, 2, 3, 4, 5] and record.evaluations == 5
    for k, point in enumerate(record.curve, 1):
        assert k / 5 * budget <= point["train_flops"] < k / 5 * budget + per_step
        assert point["budget_fraction"] == point["train_flops"] / budget
    assert record.eval_images == 150  # digits' whole validation split (eval_images unset)
    # evaluations draw on no training random stream: one evaluation or five, the same training
    once = run_trial(config(tmp_path / "once", budget_kind="flops", budget=budget, evaluations=1))
    assert [p["step"] for p in once.curve] == [8] and once.curve[0]["val_bpd"] == record.curve[-1]["val_bpd"]
    assert once.curve[0]["train_flops"] == record.train_flops
    a, b = (load_checkpoint(tmp_path / run / "checkpoint")["model"] for run in ("run", "once"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_flops_are_measured_by_the_counter_not_a_formula(tmp_path):
    """Twice the coupling width costs more FLOPs per image; gradient checkpointing recomputes forwards."""
    narrow = run_trial(config(tmp_path / "a", budget=1))
    wide = run_trial(config(tmp_path / "b", budget=1, hparams=dict(depth=2, levels=2, hidden_channels=16)))
    lean = run_trial(config(tmp_path / "c", budget=1, memory_saving=True))
    assert wide.flops_per_image > 1.5 * narrow.flops_per_image
    assert lean.flops_per_image > narrow.flops_per_image


def test_selected_weights_are_the_best_validation_step(tmp_path):
    record = run_trial(config(tmp_path, budget=40, evaluations=8))
    selected = load_checkpoint(tmp_path / "checkpoint" / "selected.pt")
    assert selected["best"]["step"] == record.selected_step
    assert selected["best"]["val_bpd"] == min(p["val_bpd"] for p in record.curve)


def test_five_bit_model_reloads_as_five_bit(tmp_path):
    run_trial(config(tmp_path, budget=2, hparams=dict(depth=1, levels=2, hidden_channels=8, n_bits=5)))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoint"))
    assert model.n_bits == 5
    assert (model.images(model.sample(4)).int() % 8 == 0).all()  # 32 levels on the 0-255 scale


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    run_trial(config(tmp_path, budget=10))
    path = tmp_path / "checkpoint" / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FlowbenchError, match="corrupted or not a flowbench checkpoint.*delete it"):
        load_checkpoint(path)


def test_checkpoint_rebuilds_the_model(tmp_path):
    run_trial(config(tmp_path, budget=10))
    state = load_checkpoint(tmp_path / "checkpoint")
    model = model_from_checkpoint(state)
    assert model.sample(2).shape == (2, 1, 8, 8)
    assert not list(tmp_path.glob("checkpoint/*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(FlowbenchError, match="no CUDA GPU"):
        run_trial(config(tmp_path, device="cuda"))


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(FlowbenchError, match="unknown model 'glwo': did you mean 'glow'"):
        run_trial(config(tmp_path, model="glwo"))
    with pytest.raises(FlowbenchError, match="data set not found at .*nowhere"):
        run_trial(config(tmp_path, dataset="cifar10", data_root=str(tmp_path / "nowhere")))
    with pytest.raises(FlowbenchError, match="cannot build 'glow'"):
        run_trial(config(tmp_path, hparams=dict(levels=4)))


def test_memory_saving_trial_reaches_the_plain_trials_result(tmp_path):
    plain = run_trial(config(tmp_path / "plain", budget=10))
    lean = run_trial(config(tmp_path / "lean", budget=10, memory_saving=True))
    assert plain.config_hash != lean.config_hash and len(plain.curve) == len(lean.curve) == 2
    for p, q in zip(plain.curve, lean.curve, strict=True):
        assert q["train_bpd"] == pytest.approx(p["train_bpd"], rel=1e-5)
        assert q["val_bpd"] == pytest.approx(p["val_bpd"], rel=1e-5)


def test_bf16_coupling_trial_trains_close_to_float32(tmp_path):
    full = run_trial(config(tmp_path / "full", budget=10))
    mixed = run_trial(config(tmp_path / "mixed", budget=10, coupling_precision="bfloat16"))
    assert mixed.status == "ok" and mixed.config_hash != full.config_hash
    assert mixed.test_bpd == pytest.approx(full.test_bpd, abs=0.1)
