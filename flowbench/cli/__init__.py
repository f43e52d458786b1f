"""The ``flowbench`` command: the only place that prints or draws progress."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys

from flowbench import stopping
from flowbench.atomic import write_error
from flowbench.cli.latency import cmd_latency
from flowbench.cli.options import BUDGET_KINDS, hparam_option, image_shape_option, number_option
from flowbench.cli.sweep import cmd_report, cmd_sweep
from flowbench.cli.train import cmd_data_prepare, cmd_models, cmd_sample, cmd_train
from flowbench.errors import FlowbenchError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (its default prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes '-1e-3' for an option (its pattern knows no exponent): a value here
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: flowbench's version, the commit it runs from and torch's build (computed when
    asked: torch is not imported to parse a command)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print flowbench's version, commit and torch build")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        import torch

        from flowbench.trial.settings import git_commit

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        print(f"flowbench {version('flowbench')} (commit {git_commit()[:12]}), torch {torch.__version__} ({build})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowbench", description="Compare normalizing flows on equal budgets.")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered flows with their parameter counts")
    p.add_argument("--image-shape", type=image_shape_option, default=(3, 32, 32), help="C x H x W (default 3x32x32)")
    p.add_argument("--dataset", default="cifar10", help="whose card hyperparameters to use (default cifar10)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="run one trial without Ray")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--data-root", help="folder (or file) holding the data set's files")
    for kind, typ in BUDGET_KINDS.items():
        p.add_argument(
            f"--budget-{kind}",
            type=number_option(typ),
            help=f"train for this many {kind}"
            + (" (training FLOPs, measured; equal compute across models)" if kind == "flops" else ""),
        )
    p.add_argument("--seed", type=number_option(int), default=0)
    recipe = " (default: the model card's recipe for the data set)"
    p.add_argument("--optimizer", choices=["adam", "adamax"], help="optimiser" + recipe)
    p.add_argument("--batch-size", type=number_option(int), help="global batch" + recipe)
    p.add_argument("--lr", type=number_option(float), help="learning rate" + recipe)
    p.add_argument("--warmup-steps", type=number_option(int), help="linear learning-rate warm-up" + recipe)
    p.add_argument("--grad-clip", type=number_option(float), help="max gradient norm" + recipe)
    p.add_argument("--no-grad-clip", action="store_true", help="no gradient clipping, whatever the card says")
    p.add_argument(
        "--evaluations",
        type=number_option(int),
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
    p.add_argument("--hparam", type=hparam_option, action="append", help="KEY=VALUE over the model card's")
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
        type=number_option(float, gt=0, le=1),
        help="with --dry-run: the fraction of an accelerator's dense peak a trial reaches (default 0.3)",
    )
    p.add_argument("--address", help="Ray cluster to join ('auto' or HOST:PORT); default a local Ray")
    p.add_argument("--mlflow-uri", help="tracking server (default: sqlite under results/NAME/)")
    # ~ expands here, where the driver runs: `ray job submit -- … --results '~/results'` is the head's home
    p.add_argument("--results", type=os.path.expanduser, default="results", help="results root (default results/)")
    p.add_argument("--num-cpus", type=number_option(int, ge=1), help="CPUs of the local Ray (default: all)")
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

    p = sub.add_parser("latency", help="time a finished sweep's selected weights again on this machine")
    p.add_argument("results_dir", help="results/NAME of a finished sweep (its trials.parquet and weights/)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where torch sees a GPU, else cpu")
    p.add_argument("--batch-sizes", type=number_option(int, ge=1), nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=number_option(int, ge=2), default=10, help="interleaved timing rounds")
    p.add_argument("--warmup", type=number_option(int, ge=0), default=2, help="untimed calls of each first")
    p.add_argument("--threads", type=number_option(int, ge=1), help="intra-op threads (default: this process's CPUs)")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("sample", help="write a grid of samples from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=number_option(int, ge=1), default=64)
    p.add_argument("--temperature", type=number_option(float, ge=0), default=0.7)
    p.add_argument("--seed", type=number_option(int, ge=0), default=0)
    p.add_argument("--scale", type=number_option(int, ge=1), default=2, help="enlarge pixels this many times")
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
