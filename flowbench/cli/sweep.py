"""The sweep commands: ``sweep`` (the plan, the run and its progress) and ``report``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from flowbench.errors import FlowbenchError


def _sweep_spec(text: str) -> Path:
    """A sweep spec file, else the spec of that name shipped in the package (``table2-cpu``, or
    ``sweeps/table2-cpu.yaml`` run from outside the checkout): a wheel carries the examples."""
    import importlib.resources

    path = Path(text)
    if path.exists():
        return path
    shipped = importlib.resources.files("flowbench") / "specs"
    found = shipped / f"{path.stem}.yaml"
    if found.is_file():
        return Path(str(found))
    names = sorted(f.name.removesuffix(".yaml") for f in shipped.iterdir() if f.name.endswith(".yaml"))
    raise FlowbenchError(
        f"{text}: no such sweep spec file, nor a shipped spec of that name; give a YAML file or one "
        f"of {', '.join(names)}"
    )


def _count(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:,.0f}"


def _flops(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"


def print_plan(spec_path: Path, measure: bool, mfu: float | None) -> None:
    """The sweep's trials and what they will cost (``flowbench.sweep.cost``), without running them."""
    from flowbench.sweep.cost import ACCELERATORS, DEFAULT_MFU, plan_cost

    cost = plan_cost(spec_path, measure)
    spec, trials = cost.spec, cost.trials
    fraction = DEFAULT_MFU if mfu is None else mfu
    print(
        f"sweep {spec.name}: {len(trials)} trials, budget {spec.budget.amount:g} {spec.budget.kind} each, "
        f"{spec.train.evaluations} evaluations along it"
        + (f", {spec.search.num_samples} search samples per model and data set (not costed)" if spec.search else "")
    )
    for name, why in cost.absent.items():
        info = cost.infos[name]
        sizes = " / ".join(f"{n:,}" for n in info.sizes.values())
        print(
            f"  {name}: planned from its published shape {'x'.join(map(str, info.image_shape))} and sizes {sizes} "
            f"(train / validation / test): {why}"
        )
    header = ["trial", "FLOPs/image", "steps", "images", "training FLOPs", "evaluation FLOPs"]
    header += ["hours here"] if measure else []
    rows = [
        [
            t.config.trial_id,
            _flops(t.flops_per_image),
            _count(t.steps),
            _count(t.images),
            _flops(t.train_flops),
            _flops(t.eval_flops),
            *([f"{t.seconds_here / 3600:.2f}"] if measure else []),
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  "
            + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        )
    train, evaluation = cost.total("train_flops"), cost.total("eval_flops")
    total = _flops(train + evaluation)
    print(f"total: {_flops(train)} training FLOPs, {_flops(evaluation)} evaluation FLOPs, {total} in all")
    if math.isnan(train):
        print("  a seconds budget: its FLOPs are known once it runs (--measure counts them at this machine's speed)")
        return
    precision = {t.config.coupling_precision for t in trials}
    print(
        f"GPU-hours at {fraction:.0%} of the datasheet's dense peak"
        + ("" if mfu is not None else " (an assumption, not measured: --mfu sets it)")
        + f", at the trials' precision ({', '.join(sorted('TF32' if p == 'float32' else 'BF16' for p in precision))}):"
    )
    for gpu in ACCELERATORS:
        hours = cost.gpu_hours(gpu, fraction)
        spent = f"{hours:,.1f} GPU-hours" if hours >= 0.1 else f"{hours * 3600:.3g} GPU-seconds"
        print(f"  {gpu.name:14s} {spent:>20s}  (dense peak TF32 {gpu.tf32:g}, BF16 {gpu.bf16:g} TFLOP/s: {gpu.source})")
    if measure:
        print(
            f"this machine: {cost.total('seconds_here') / 3600:,.2f} hours one trial after another "
            f"(each model's step and evaluation timed here)"
        )
    else:
        print("this machine: --measure times a few training steps of each model here")


def cmd_sweep(args) -> None:
    from flowbench.sweep.plan import plan_sweep  # no Ray: a dry run validates a spec where Ray is not installed

    args.spec = _sweep_spec(args.spec)
    if not args.dry_run and (args.measure or args.mfu is not None):
        raise FlowbenchError("--measure and --mfu go with --dry-run (they cost a sweep, they do not run it)")
    if args.dry_run:
        print_plan(args.spec, args.measure, args.mfu)
        return
    # Ray's native failure handler (read when Ray is imported) would turn a SIGTERM to this driver
    # into a crash dump and an abort; flowbench stops in order instead. Only this process goes
    # without it: the variable is gone before Ray starts its own processes
    own = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" in os.environ
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from flowbench.sweep.driver import run_sweep

    if not own:
        del os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"]

    from flowbench.cli.progress import (
        SweepProgress,
        headline,
        local_slots,
        opening_line,
        planned_trials,
        recorded_trials,
    )
    from flowbench.sweep.latency import describe

    planned = plan_sweep(args.spec)
    spec = planned.spec
    total, recorded = planned_trials(planned), recorded_trials(planned, Path(args.results).resolve() / spec.name)
    slots = None if args.address else local_slots(planned, args.num_cpus)
    print(opening_line(planned, total, recorded, slots), flush=True)  # with the summary: stderr is for errors
    progress = SweepProgress(planned, total, len(recorded))
    try:
        outcome = run_sweep(
            args.spec,
            args.results,
            args.address,
            args.mlflow_uri,
            (progress.callback,),
            args.num_cpus,
            args.storage,
            planned,
        )
    finally:
        progress.close()
    for line in headline(outcome.trials):
        print(line)
    counts = outcome.trials["status"].value_counts().to_dict()
    print(f"sweep {spec.name}: {len(outcome.trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    if outcome.changed:
        print(f"  re-ran   {len(outcome.changed)} whose configuration changed; old records in {outcome.archive}")
    eff = outcome.efficiency
    if eff["efficiency"] is None:
        print("  ran      nothing: every trial had finished in an earlier run")
    else:
        print(
            f"  slots    {eff['efficiency']:.0%} busy: {eff['trials_run']} trials, {eff['busy_seconds']:.0f} s of "
            f"training over {eff['slots']} slots x {eff['wall_seconds']:.0f} s"
        )
    print(f"  tables   {outcome.results_dir}/trials.parquet, curves.parquet, table2.parquet")
    print(f"  latency  {outcome.results_dir}/latency.parquet: {describe(outcome.latency)}")
    print(f"  report   {outcome.results_dir}/report.md, report.html, plots/")
    print(
        f"  mlflow   {outcome.mlflow_uri} (experiment {spec.name})"
        + ("" if outcome.tracked else ": incomplete, its store failed; run the same command again to log the rest")
    )
    if outcome.mlflow_uri.startswith(("http://", "https://")):
        print(f"  browse   {outcome.mlflow_uri}")
    else:
        print(f"  browse   mlflow ui --backend-store-uri {outcome.mlflow_uri}  (then http://127.0.0.1:5000)")


def cmd_report(args) -> None:
    from flowbench.results.report import build_report, report_from_dir

    if args.mlflow_uri:
        from flowbench.results.from_mlflow import tables_from_mlflow

        if not args.experiment:
            raise FlowbenchError("--mlflow-uri needs --experiment NAME (the sweep's name)")
        trials, curves = tables_from_mlflow(args.mlflow_uri, args.experiment)
        out = Path(args.results_dir or f"results/{args.experiment}-from-mlflow")
        paths = build_report(out, trials, curves)
    elif args.results_dir:
        paths = report_from_dir(args.results_dir)
    else:
        raise FlowbenchError("give a results folder (results/NAME) or --mlflow-uri URI --experiment NAME")
    print(f"wrote {paths['md']}, {paths['html']}, {paths['table2']} and {len(paths['plots'])} plots")
