"""The ``flowbench`` command: the only place that prints or draws progress."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import pydantic

from flowbench import stopping
from flowbench.atomic import write_error
from flowbench.errors import FlowbenchError
from flowbench.specfile import error_location, parse_scalar

log = logging.getLogger("flowbench")
BUDGET_KINDS = {"steps": int, "epochs": float, "seconds": float, "images": int, "flops": float}


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image shape must look like 3x32x32, got {text!r}") from None
    return c, h, w


def _hparam(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hparam takes KEY=VALUE, got {text!r}")
    return key, parse_scalar(value)


def _number(kind: type, **bounds):
    """An argparse type: a number as a spec would read it (1e-4, 3, 1e3 for an integer), finite,
    within ``bounds`` (pydantic.Field's gt, ge, …)."""
    finite: dict[str, Any] = {"allow_inf_nan": False} if kind is float else {}
    number: Any = Annotated[kind, pydantic.Field(**finite, **bounds)]  # a type made at run time
    adapter = pydantic.TypeAdapter(number)

    def parse(text: str):
        value = parse_scalar(text)
        try:
            if isinstance(value, bool):  # YAML's yes/true: not a number, though pydantic would take it for 1
                raise ValueError
            return adapter.validate_python(value)
        except (ValueError, pydantic.ValidationError) as err:
            problem = err.errors()[0]["msg"] if isinstance(err, pydantic.ValidationError) else "not a number"
            raise argparse.ArgumentTypeError(f"{problem[0].lower()}{problem[1:]}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _option_error(err: pydantic.ValidationError, budget_kind: str) -> FlowbenchError:
    """The one line for a trial config the command-line options make invalid, naming the option."""
    loc, message = error_location(err.errors()[0])
    field = str(loc[0]) if loc else ""
    option = {"budget": f"budget-{budget_kind}", "hparams": "hparam"}.get(field, field.replace("_", "-"))
    return FlowbenchError(f"--{option}: {message}")


def _cli_hparams(model: str, pairs) -> dict:
    """--hparam KEY=VALUE pairs typed and range-checked as a card's hyperparameters are."""
    from flowbench.cards import check_hparams
    from flowbench.specfile import FieldError

    given = dict(pairs or [])
    try:
        return check_hparams(model, given)
    except FieldError as err:
        key = err.loc[0] if err.loc else ""
        raise FlowbenchError(f"--hparam {key}={given.get(key)}: {err}") from None


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (its default prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes '-1e-3' for an option (its pattern knows no exponent): a value here
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_models(args) -> None:
    import flowbench
    from flowbench.cards import load_card

    rows = []
    for name in flowbench.list_models():
        card = load_card(name)
        hparams = card.hparams_for(args.dataset)
        model = flowbench.build_model(name, args.image_shape, **hparams)
        paper_bpd = card.paper_bpd(args.dataset)
        rows.append(
            (
                name,
                f"{model.num_parameters() / 1e6:.2f}M",
                f"{model.num_allocated_parameters() / 1e6:.2f}M",
                "—" if paper_bpd is None else f"{paper_bpd:.2f}",
                " ".join(f"{k}={v}" for k, v in hparams.items()),
                card.paper,
            )
        )
    # params: the entries that can change the map (what every report counts); allocated: all entries
    header = ("model", "params", "allocated params", f"paper bpd ({args.dataset})", "hparams", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"image shape {'x'.join(map(str, args.image_shape))}, hyperparameters of the {args.dataset} cards")
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cmd_train(args) -> None:
    from tqdm import tqdm

    from flowbench.atomic import atomic_write
    from flowbench.cards import load_card, training_settings
    from flowbench.data import dataset_info
    from flowbench.locks import exclusive_lock
    from flowbench.results.tables import curves_frame, trials_frame, write_table
    from flowbench.sweep.spec import data_fingerprint
    from flowbench.trial import CHECKPOINT_FILE, TrialConfig, TrialInterrupted, load_checkpoint, run_trial

    budgets = {k: getattr(args, f"budget_{k}") for k in BUDGET_KINDS}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) > 1:
        raise FlowbenchError(f"give one budget, got {', '.join('--budget-' + k for k in given)}")
    kind, amount = next(iter(given.items())) if given else ("steps", 500)
    hparams = load_card(args.model).hparams_for(args.dataset) | _cli_hparams(args.model, args.hparam)
    out = Path(args.out or f"runs/{args.model}-{args.dataset}-seed{args.seed}")
    explicit = {
        k: getattr(args, k)
        for k in ("optimizer", "batch_size", "lr", "warmup_steps", "grad_clip")
        if getattr(args, k) is not None
    }
    if args.no_grad_clip:
        explicit["grad_clip"] = None
    train, source = training_settings(args.model, args.dataset, explicit)
    info = dataset_info(args.dataset, args.data_root)  # a missing data set is one line, before anything starts
    try:
        config = TrialConfig(
            model=args.model,
            dataset=args.dataset,
            hparams=hparams,
            seed=args.seed,
            budget_kind=kind,
            budget=amount,
            **train,
            recipe_source=source,
            data_fingerprint=data_fingerprint(info),
            evaluations=args.evaluations,
            memory_saving=args.memory_saving,
            coupling_precision=args.coupling_precision,
            numerics=args.numerics,
            compile=args.compile,
            data_root=args.data_root,
            device=args.device,
            out_dir=str(out),
            trial_id=out.name,
        )
    except pydantic.ValidationError as err:
        raise _option_error(err, kind) from None
    if args.dry_run:
        settings = config.model_dump(exclude={"hparams", "data_fingerprint", "recipe_source"})
        shape = "x".join(map(str, info.image_shape))
        print(f"trial {config.trial_id} ({config.config_hash()}): {config.model} on {config.dataset} {shape}")
        print(f"  hparams  {' '.join(f'{k}={v}' for k, v in hparams.items())}")
        print(f"  settings {' '.join(f'{k}={v}' for k, v in settings.items() if k not in ('model', 'dataset'))}")
        return
    # one owner per output folder: a second train into it is refused, naming the first
    with exclusive_lock(out, "flowbench train"):
        checkpoint = out / "checkpoint" / CHECKPOINT_FILE
        resume = None
        if checkpoint.exists():
            if load_checkpoint(checkpoint)["config_hash"] != config.config_hash():
                raise FlowbenchError(f"{out} holds a trial of another configuration: use another --out or delete it")
            resume = checkpoint
            print(f"resuming from {checkpoint}", file=sys.stderr)

        # drawn from the first step on (an error before training prints alone) and moved every step;
        # its rate is the average since then (smoothing=0): wall time, evaluations included, so never
        # above the steps' own rate
        bars: list[tqdm] = []

        def step(spent: float) -> None:
            if not bars:
                bars.append(
                    tqdm(
                        total=amount,
                        initial=spent,
                        desc=f"{args.model} on {args.dataset}",
                        unit=kind,
                        smoothing=0,
                        file=sys.stderr,
                        disable=None,  # a terminal's: no carriage-return frames in a log file (SLURM's, a pipe's)
                    )
                )
            else:
                bars[0].update(spent - bars[0].n)

        def report(metrics, checkpoint_dir):
            bars[0].set_postfix(train_bpd=f"{metrics['train_bpd']:.3f}", val_bpd=f"{metrics['val_bpd']:.3f}")

        stop = stopping.current()
        try:
            record = run_trial(config, report, resume_from=resume, on_step=step, stop=stop.is_set if stop else None)
        except TrialInterrupted as interrupted:
            assert stop is not None, "only a stop request interrupts a trial"
            # the checkpoint folder holds that step: written now, or the one it resumed from or just wrote
            reached = interrupted.step
            stop.check(
                f"at step {reached}, checkpointed in {out / 'checkpoint'}" if reached else "before its first step"
            )
            raise
        finally:
            for bar in bars:
                bar.close()
        row = record.row()
        with atomic_write(out / "record.json") as tmp:  # the folder may not exist yet (diverged at step 1)
            tmp.write_text(json.dumps(row, indent=2))
        write_table(trials_frame([row]), out / "record.parquet", "trials")
        write_table(curves_frame([row], [record.curve]), out / "curve.parquet", "curves")
        if stop is not None:
            stop.check(f"after the trial had finished: its record is in {out}/record.json", resumable=False)
    if record.status != "ok":
        print(
            f"flowbench: {record.model} on {record.dataset} {record.status}: {record.reason}; "
            f"record in {out}/record.json",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"{record.model} on {record.dataset}: status ok")
    print(
        f"  test bits/dim   {record.test_bpd:.4f}   (selected on validation: {record.val_bpd:.4f} at step "
        f"{record.selected_step}; last train interval {record.train_bpd:.4f})"
    )
    print(
        f"  spent           {record.steps} steps, {record.images_seen} images, {record.epochs:.2f} epochs, "
        f"{record.train_flops:.3g} FLOPs ({record.flops_per_image:.3g} per image), "
        f"{record.train_seconds:.1f} s training ({record.throughput_images_per_s:.1f} images/s)"
        + (f", {record.compile_seconds:.1f} s compiling" if record.compile_seconds else "")
    )
    print(f"  recipe          {record.recipe}")
    print(f"  parameters      {record.num_params:,} effective ({record.num_params_allocated:,} allocated)")
    print(
        f"  latency (batch {record.latency_batch_size})  log_prob {record.density_latency_ms:.1f} ms, "
        f"sample {record.sample_latency_ms:.1f} ms  (median)"
    )
    print(f"  peak memory     {record.peak_memory_mb:.0f} MB ({record.memory_kind})")
    print(f"  written         {out}/record.json, record.parquet, curve.parquet, checkpoint/")


def cmd_sample(args) -> None:
    import torch

    from flowbench.results.plots import image_grid, save_png
    from flowbench.trial import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(args.checkpoint)).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = model.images(model.sample(args.n, args.temperature, generator=gen))
    path = save_png(image_grid(images.numpy()), args.out, scale=args.scale)
    print(f"wrote {args.n} samples at temperature {args.temperature} to {path}")


def cmd_data_prepare(args) -> None:
    from flowbench.data import prepare_dataset

    cache, manifest, built = prepare_dataset(args.name, args.root, args.cache)
    sizes = ", ".join(f"{split} {n:,}" for split, n in manifest["splits"].items())
    shape = "x".join(map(str, manifest["image_shape"]))
    print(f"{args.name}: {'prepared' if built else 'already prepared, unchanged'} {cache}")
    print(f"  {sizes} images of {shape}, {manifest['n_bits']} bits, from {manifest['source']}")
    print(f"  trials find it from the same --data-root, or give --data-root {cache}")


class SweepProgress:
    """A Tune callback drawing the sweep's live state: done/running/failed and the best bits/dim."""

    def __init__(self):
        from ray import tune

        class _Callback(tune.Callback):
            def on_trial_result(cb, iteration, trials, trial, result, **info):
                self.show(trials)

            def on_trial_complete(cb, iteration, trials, trial, **info):
                self.show(trials, trial)

            def on_trial_error(cb, iteration, trials, trial, **info):
                self.show(trials, trial)

        self.callback, self.best = _Callback(), None

    def show(self, trials, finished=None) -> None:
        counts = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "RUNNING", "ERROR", "PENDING")}
        for t in trials:
            bpd = (t.last_result or {}).get("val_bpd")
            if isinstance(bpd, float) and bpd == bpd and (self.best is None or bpd < self.best[0]):
                self.best = (bpd, str(t))
        best = f"best validation bpd {self.best[0]:.3f} ({self.best[1]})" if self.best else "no evaluation yet"
        line = (
            f"[{counts['TERMINATED']} done, {counts['RUNNING']} running, {counts['ERROR']} failed, "
            f"{counts['PENDING']} pending] {best}"
        )
        if finished is not None:
            status = (finished.last_result or {}).get("status", "failed" if finished.status == "ERROR" else "stopped")
            line += f"  <- {finished} {status}"
        print(line, file=sys.stderr, flush=True)


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
    """The sweep's trials and what they will cost (``flowbench.sweep.plan``), without running them."""
    from flowbench.sweep.plan import ACCELERATORS, DEFAULT_MFU, plan_cost

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
    from flowbench.sweep.units import plan  # no Ray: a dry run validates a spec where Ray is not installed

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

    spec, _ = plan(args.spec)
    progress = SweepProgress()
    outcome = run_sweep(
        args.spec, args.results, args.address, args.mlflow_uri, (progress.callback,), args.num_cpus, args.storage
    )
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
    print(f"  report   {outcome.results_dir}/report.md, report.html, plots/")
    print(
        f"  mlflow   {outcome.mlflow_uri} (experiment {spec.name})"
        + ("" if outcome.tracked else ": incomplete, its store failed; run the same command again to log the rest")
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowbench", description="Compare normalizing flows on equal budgets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered flows with their parameter counts")
    p.add_argument("--image-shape", type=_shape, default=(3, 32, 32), help="C x H x W (default 3x32x32)")
    p.add_argument("--dataset", default="cifar10", help="whose card hyperparameters to use (default cifar10)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="run one trial without Ray")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--data-root", help="folder (or file) holding the data set's files")
    for kind, typ in BUDGET_KINDS.items():
        p.add_argument(
            f"--budget-{kind}",
            type=_number(typ),
            help=f"train for this many {kind}"
            + (" (training FLOPs, measured; equal compute across models)" if kind == "flops" else ""),
        )
    p.add_argument("--seed", type=_number(int), default=0)
    recipe = " (default: the model card's recipe for the data set)"
    p.add_argument("--optimizer", choices=["adam", "adamax"], help="optimiser" + recipe)
    p.add_argument("--batch-size", type=_number(int), help="global batch" + recipe)
    p.add_argument("--lr", type=_number(float), help="learning rate" + recipe)
    p.add_argument("--warmup-steps", type=_number(int), help="linear learning-rate warm-up" + recipe)
    p.add_argument("--grad-clip", type=_number(float), help="max gradient norm" + recipe)
    p.add_argument("--no-grad-clip", action="store_true", help="no gradient clipping, whatever the card says")
    p.add_argument(
        "--evaluations",
        type=_number(int),
        default=10,
        help="validation evaluations along the budget, the k-th at k/N of it, a checkpoint at each (default 10)",
    )
    p.add_argument("--memory-saving", action="store_true", help="gradient checkpointing per flow step")
    p.add_argument(
        "--coupling-precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute of the coupling networks; maps and log-dets stay float32",
    )
    p.add_argument(
        "--numerics",
        choices=["native", "portable"],
        default="native",
        help="portable: the same bits on every x86-64 CPU with AVX2 (one thread, pinned kernels; ~1.5x slower)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (needs a C++ compiler on CPU; its time is recorded apart)",
    )
    p.add_argument("--hparam", type=_hparam, action="append", help="KEY=VALUE over the model card's")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--out", help="output folder (default runs/MODEL-DATASET-seedN); re-running resumes")
    p.add_argument("--dry-run", action="store_true", help="validate the options, card and data set; train nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run (or resume) a sweep spec as Ray Tune trials")
    p.add_argument("spec", help="sweep YAML, e.g. sweeps/table2.yaml, or the name of a shipped one (table2-cpu)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the trials with their FLOPs and the GPU-hours they need; run nothing (no data needed)",
    )
    p.add_argument("--measure", action="store_true", help="with --dry-run: time a few steps of each model here")
    p.add_argument(
        "--mfu",
        type=_number(float, gt=0, le=1),
        help="with --dry-run: the fraction of an accelerator's dense peak a trial reaches (default 0.3)",
    )
    p.add_argument("--address", help="Ray cluster to join ('auto' or HOST:PORT); default a local Ray")
    p.add_argument("--mlflow-uri", help="tracking server (default: sqlite under results/NAME/)")
    # ~ expands here, where the driver runs: `ray job submit -- … --results '~/results'` is the head's home
    p.add_argument("--results", type=os.path.expanduser, default="results", help="results root (default results/)")
    p.add_argument("--num-cpus", type=_number(int, ge=1), help="CPUs of the local Ray (default: all)")
    p.add_argument(
        "--storage",
        type=os.path.expanduser,
        help="Tune storage every node reaches (s3://…, NFS); default results/NAME/tune",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="regenerate Table 2, plots and the report from a sweep's tables")
    p.add_argument(
        "results_dir",
        nargs="?",
        help="results/NAME holding trials.parquet and curves.parquet (with --mlflow-uri: where to write)",
    )
    p.add_argument("--mlflow-uri", help="rebuild from this MLflow store's runs instead of the Parquet tables")
    p.add_argument("--experiment", help="with --mlflow-uri: the sweep's name")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="write a grid of samples from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=_number(int, ge=1), default=64)
    p.add_argument("--temperature", type=_number(float, ge=0), default=0.7)
    p.add_argument("--seed", type=_number(int, ge=0), default=0)
    p.add_argument("--scale", type=_number(int, ge=1), default=2, help="enlarge pixels this many times")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    data = sub.add_parser("data", help="data set commands").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="convert a data set once into the memory-mapped cache trials read")
    p.add_argument("name", help="data set name, e.g. cifar10, imagenet32")
    p.add_argument("--root", "--data-root", dest="root", help="the data set's files (not needed for embedded, digits)")
    p.add_argument("--cache", help="cache folder (default $FLOWBENCH_CACHE_DIR or ~/.cache/flowbench/NAME-HASH)")
    p.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # MLflow sets its loggers' level when it is first imported (later, lazily): from this variable
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    for noisy in ("mlflow", "alembic", "ray"):
        logging.getLogger(noisy).setLevel(level)
    # urllib3 warns of each HTTP retry to a tracking server that went away: the sweep says it once
    logging.getLogger("urllib3").setLevel(level if args.verbose else logging.ERROR)
    if not args.verbose:  # it logs a database error with its traceback, then raises it: reported below
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    if getattr(args, "numerics", "native") == "portable":  # before torch runs a kernel in this process
        from flowbench.numerics import environment_for

        os.environ.update(environment_for("portable"))
    try:
        if args.command in ("train", "sweep"):  # SIGINT and SIGTERM stop these in order
            with stopping.StopRequest():
                args.func(args)
        else:
            args.func(args)
    except stopping.Interrupted as stop:
        again = f"; run `{shlex.join(['flowbench', *argv])}` to resume" if stop.resumable else ""
        print(f"flowbench: {stop}{again}", file=sys.stderr)
        return stop.exit_status
    except FlowbenchError as err:
        print(f"flowbench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flowbench … | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as err:  # a full disk or a closed folder outside atomic_write (MLflow, Ray, folders)
        translated = write_error(err.filename or "the output", err)
        if translated is None:
            raise
        print(f"flowbench: error: {translated}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowbench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
