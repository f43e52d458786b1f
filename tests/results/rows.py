"""Full trials.parquet rows (every TrialRecord column) with the figures a test sets."""

from flowbench.record import TrialRecord


def trial(model, dataset, seed, bpd, status="ok", phase="final", params=1000, variant="", **figures) -> dict:
    """One trial row; val_bpd is test_bpd + 0.01 unless given."""
    record = TrialRecord(
        sweep="s",
        trial_id=f"{model}-{variant}-{dataset}-seed{seed}",
        model=model,
        dataset=dataset,
        seed=seed,
        config_hash="h",
        variant=variant,
        status=status,
        phase=phase,
        test_bpd=bpd,
        val_bpd=bpd + 0.01,
        num_params=params,
        num_params_allocated=params + 10,
        throughput_images_per_s=100.0,
        steps=50,
        budget=1e9,
        budget_kind="flops",
        flops_per_image=2e6,
        evaluations=2,
        eval_images=100,
        train_flops=1e9,
        images_seen=500,
        flowbench_version="0.1.0",
        torch_version="2",
        device="cpu",
        git_commit="abc",
    )
    return record.row() | figures
