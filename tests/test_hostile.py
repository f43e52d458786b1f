"""flowbench used as a hostile user (or a shared machine) would: specs and command lines typed
by hand, two owners of one output, a full or read-only disk, a card edited between runs, a
driver killed mid-sweep. Each must end in ONE line that names the problem, a non-zero exit, no
traceback, and nothing lost or half-written."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flowbench.cli import main
from flowbench.errors import FlowbenchError
from flowbench.locks import LOCK_FILE, exclusive_lock
from tests.test_atomic import mounted_tmpfs, remount_readonly

TINY = ["--hparam", "depth=2", "--hparam", "levels=2", "--hparam", "hidden_channels=8"]

BASE = """\
name: hostile
models: [glow, nxn_shift]
datasets: [digits]
seeds: [0, 1]
budget: {steps: 20}
train: {batch_size: 32, lr: 1e-3, evaluations: 2}
overrides:
  glow: {depth: 2, levels: 2, hidden_channels: 8}
  nxn_shift: {depth: 2, levels: 2, hidden_channels: 8}
"""


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``flowbench ARGV`` in this process; argparse's exits included."""
    try:
        rc = main(argv)
    except SystemExit as done:
        rc = done.code
    return rc, capsys.readouterr().err


PROGRESS_BAR = re.compile(r"^\S.*: +\d+%\|")  # tqdm's redrawn line, drawn once training runs


def assert_one_line(rc: int, err: str, pattern: str) -> None:
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), err


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def appended(text: str) -> str:
    return BASE + text + "\n"


# (spec text, the key the error must name, what it must say); the line is found independently:
# the first line holding the key's last part, at or below its parents' lines
SPECS = {
    "lr-negative": (edited("lr: 1e-3", "lr: -1.0e-3"), "train.lr", "greater than 0"),
    "lr-not-a-number": (edited("lr: 1e-3", "lr: 1e-3x"), "train.lr", "valid number"),
    "lr-nan": (edited("lr: 1e-3", "lr: .nan"), "train.lr", "finite number"),
    "grad-clip-negative": (edited("lr: 1e-3,", "lr: 1e-3, grad_clip: -1.0,"), "train.grad_clip", "greater than 0"),
    "grad-clip-inf": (edited("lr: 1e-3,", "lr: 1e-3, grad_clip: .inf,"), "train.grad_clip", "finite number"),
    "batch-zero": (edited("batch_size: 32", "batch_size: 0"), "train.batch_size", "greater than 0"),
    "batch-fraction": (edited("batch_size: 32", "batch_size: 2.5"), "train.batch_size", "fractional part"),
    "warmup-negative": (
        edited("lr: 1e-3,", "lr: 1e-3, warmup_steps: -5,"),
        "train.warmup_steps",
        "greater than or equal to 0",
    ),
    "evaluations-zero": (edited("evaluations: 2", "evaluations: 0"), "train.evaluations", "greater than 0"),
    "eval-images-zero": (edited("lr: 1e-3,", "lr: 1e-3, eval_images: 0,"), "train.eval_images", "greater than 0"),
    "step-intervals-of-old-specs": (
        edited("evaluations: 2", "eval_every: 10, checkpoint_every: 10"),
        "train.eval_every",
        r"evaluations are placed along the budget now: give evaluations: N \(the k-th at k/N of the budget",
    ),
    "steps-zero": (edited("{steps: 20}", "{steps: 0}"), "budget.steps", "greater than 0"),
    "steps-inf": (edited("{steps: 20}", "{steps: .inf}"), "budget.steps", "finite number"),
    "epochs-nan": (edited("{steps: 20}", "{epochs: .nan}"), "budget.epochs", "finite number"),
    "seconds-negative": (edited("{steps: 20}", "{seconds: -60}"), "budget.seconds", "greater than 0"),
    "flops-negative": (edited("{steps: 20}", "{flops: -1e12}"), "budget.flops", "greater than 0"),
    "seed-negative": (edited("seeds: [0, 1]", "seeds: [0, -1]"), "seeds.1", "greater than or equal to 0"),
    "loguniform-zero": (
        appended("search: {num_samples: 2, space: {lr: {loguniform: [0, 1e-2]}}}"),
        "search.space.lr.loguniform.0",
        "greater than 0",
    ),
    "loguniform-reversed": (
        appended("search: {num_samples: 2, space: {lr: {loguniform: [1e-2, 1e-4]}}}"),
        "search.space.lr.loguniform",
        "low < high",
    ),
    "uniform-infinite": (
        appended("search: {num_samples: 2, space: {lr: {uniform: [1e-4, .inf]}}}"),
        "search.space.lr.uniform.1",
        "finite number",
    ),
    "randint-reversed": (
        appended("search: {num_samples: 2, space: {batch_size: {randint: [64, 16]}}}"),
        "search.space.batch_size.randint",
        "low < high",
    ),
    "bound-not-a-number": (
        appended("search: {num_samples: 2, space: {lr: {loguniform: [small, 1e-2]}}}"),
        "search.space.lr.loguniform.0",
        "valid number",
    ),
    "integer-searched-continuously": (
        appended("search: {num_samples: 2, space: {batch_size: {uniform: [16, 64]}}}"),
        "search.space.batch_size.uniform",
        "integer: search it with randint or choice",
    ),
    "choice-out-of-range": (
        appended("search: {num_samples: 2, space: {grad_clip: {choice: [1.0, -1.0]}}}"),
        "search.space.grad_clip.choice.1",
        "greater than 0",
    ),
    "hparam-bound-out-of-range": (
        appended("search: {num_samples: 2, space: {depth: {randint: [0, 3]}}}"),
        "search.space.depth.randint.0",
        "greater than or equal to 1",
    ),
    "num-samples-zero": (
        appended("search: {num_samples: 0, space: {lr: {loguniform: [1e-4, 1e-2]}}}"),
        "search.num_samples",
        "greater than 0",
    ),
    "asha-factor-one": (
        appended(
            "search: {num_samples: 2, space: {lr: {loguniform: [1e-4, 1e-2]}}, "
            "asha: {grace_period: 5, reduction_factor: 1}}"
        ),
        "search.asha.reduction_factor",
        "greater than 1",
    ),
    "cpu-zero": (appended("resources: {cpu: 0}"), "resources.cpu", "greater than 0"),
    "gpu-negative": (appended("resources: {gpu: -1}"), "resources.gpu", "greater than or equal to 0"),
    "workers-zero": (appended("resources: {workers: 0}"), "resources.workers", "greater than or equal to 1"),
    "latency-batch-zero": (appended("latency: {batch_sizes: [1, 0]}"), "latency.batch_sizes.1", "greater than 0"),
    "latency-one-round": (appended("latency: {rounds: 1}"), "latency.rounds", "greater than or equal to 2"),
    "latency-retired-repeats": (appended("latency: {repeats: 20}"), "latency.repeats", "timed after training now"),
    "match-params-zero": (appended("match_params: 0"), "match_params", "greater than 0"),
    "max-failures-negative": (appended("max_failures: -1"), "max_failures", "greater than or equal to 0"),
    "override-lr-negative": (
        edited("glow: {depth: 2,", "glow: {lr: -1, depth: 2,"),
        "overrides.glow.lr",
        "greater than 0",
    ),
    "override-depth-zero": (
        edited("glow: {depth: 2,", "glow: {depth: 0,"),
        "overrides.glow.depth",
        "greater than or equal to 1",
    ),
    "override-depth-words": (edited("glow: {depth: 2,", "glow: {depth: two,"), "overrides.glow.depth", "valid integer"),
    "override-n-bits-nine": (
        edited("glow: {depth: 2,", "glow: {n_bits: 9, depth: 2,"),
        "overrides.glow.n_bits",
        "less than or equal to 8",
    ),
    "name-escapes": (edited("name: hostile", "name: ../x"), "name", "should match pattern"),
}


@pytest.mark.parametrize("text,key,message", SPECS.values(), ids=SPECS.keys())
def test_a_bad_spec_is_one_line_naming_file_line_and_key_and_writes_nothing(tmp_path, capsys, text, key, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    results = tmp_path / "results"
    rc, err = run_cli(["sweep", str(path), "--dry-run", "--results", str(results)], capsys)
    rows, line = text.splitlines(), 1
    for part in (p for p in key.split(".") if not p.isdigit()):  # each key at or below its parent's line
        line = next(i for i in range(line, len(rows) + 1) if re.search(rf"\b{part}\b", rows[i - 1]))
    assert_one_line(rc, err, rf"^flowbench: error: {re.escape(str(path))}:{line}: {re.escape(key)}: .*{message}")
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


@pytest.mark.parametrize(
    "text,message",
    [
        (BASE + "lr: 1e-3\n" + "lr: 1e-2\n", r"spec.yaml:11: malformed YAML \(key 'lr' given twice\)"),
        (
            edited("name: hostile", "name: !!python/object/apply:os.system ['touch pwned']"),
            r"spec.yaml:1: malformed YAML \(could not determine a constructor for the tag 'tag:yaml.org,2002:python",
        ),
        ("name: [unclosed\n", r"spec.yaml:\d+: malformed YAML"),
    ],
    ids=["duplicate-key", "python-tag", "unclosed"],
)
def test_malformed_or_unsafe_yaml_is_refused_in_one_line(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    rc, err = run_cli(["sweep", str(path), "--dry-run", "--results", str(tmp_path / "results")], capsys)
    assert_one_line(rc, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no 'pwned', no results


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    """Nine levels of nine YAML aliases (9**9 strings if anything expanded them)."""
    rows = [
        "name: bomb",
        "models: [glow]",
        "datasets: [digits]",
        "budget: {steps: 1}",
        "search:",
        "  num_samples: 1",
        "  space:",
        "    a0: {choice: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]}",
    ]
    rows += [f"    a{i}: {{choice: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 10)]
    path = tmp_path / "spec.yaml"
    path.write_text("\n".join(rows) + "\n")
    started = time.monotonic()
    rc, err = run_cli(["sweep", str(path), "--dry-run"], capsys)
    assert time.monotonic() - started < 10
    assert_one_line(rc, err, r"spec.yaml:8: search.space.a0: neither a train key")


TRAIN = ["train", "--model", "glow", "--dataset", "digits", "--budget-steps", "4", "--evaluations", "2", *TINY]
CLI = {
    "lr-negative": (["--lr", "-1e-3"], r"^flowbench: error: --lr: Input should be greater than 0"),
    "lr-not-a-number": (["--lr", "1e-3x"], r"argument --lr: input should be a valid number.*got '1e-3x'"),
    "lr-nan": (["--lr", "nan"], r"argument --lr: input should be a finite number"),
    "grad-clip-zero": (["--grad-clip", "0"], r"--grad-clip: Input should be greater than 0"),
    "steps-fraction": (["--budget-steps", "2.5"], r"argument --budget-steps: .*fractional part"),
    "steps-zero": (["--budget-steps", "0"], r"--budget-steps: Input should be greater than 0"),
    "flops-infinite": (["--budget-flops", "inf"], r"argument --budget-flops: input should be a finite number"),
    "two-budgets": (["--budget-epochs", "1"], r"give one budget, got --budget-steps, --budget-epochs"),
    "seed-negative": (["--seed", "-1"], r"--seed: Input should be greater than or equal to 0"),
    "batch-zero": (["--batch-size", "0"], r"--batch-size: Input should be greater than 0"),
    "batch-yes": (["--batch-size", "yes"], r"argument --batch-size: not a number, got 'yes'"),
    "warmup-negative": (["--warmup-steps", "-1"], r"--warmup-steps: Input should be greater than or equal to 0"),
    "evaluations-zero": (["--evaluations", "0"], r"--evaluations: Input should be greater than 0"),
    "step-interval-of-old": (["--eval-every", "2"], r"unrecognized arguments: --eval-every 2"),
    "hparam-zero": (["--hparam", "depth=0"], r"--hparam depth=0: Input should be greater than or equal to 1"),
    "hparam-words": (["--hparam", "depth=two"], r"--hparam depth=two: Input should be a valid integer"),
    "hparam-unknown": (["--hparam", "width=3"], r"--hparam width=3: glow has no such hyperparameter"),
    "hparam-not-key-value": (["--hparam", "depth"], r"argument --hparam: --hparam takes KEY=VALUE"),
    "unknown-model": (["--model", "glwo"], r"unknown model 'glwo': did you mean 'glow'"),
}


@pytest.mark.parametrize("extra,message", CLI.values(), ids=CLI.keys())
def test_a_bad_train_line_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    rc, err = run_cli([*TRAIN, "--out", str(tmp_path / "out"), *extra], capsys)
    assert_one_line(rc, err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "ckpt", "--n", "0"], r"argument --n: input should be greater than or equal to 1, got '0'"),
        (
            ["sample", "ckpt", "--temperature", "-0.5"],
            r"argument --temperature: input should be greater than or equal to 0",
        ),
        (["sweep", "spec.yaml", "--num-cpus", "0"], r"argument --num-cpus: input should be greater than or equal to 1"),
        (["train"], r"the following arguments are required: --model"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ],
    ids=["sample-n", "temperature", "num-cpus", "no-model", "no-command"],
)
def test_other_bad_command_lines_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert_one_line(*run_cli(argv, capsys), message)
    assert not list(tmp_path.iterdir())


def test_numbers_are_read_as_a_person_writes_them(tmp_path):
    """1e-4 (a string to YAML 1.1), 1.0e-4, 3 and '3' are numbers in a spec and on the command line."""
    from flowbench.cli import build_parser
    from flowbench.sweep.plan import plan

    path = tmp_path / "spec.yaml"
    path.write_text(
        edited("batch_size: 32", "batch_size: '32'").replace("glow: {depth: 2,", "glow: {lr: 1.0e-4, depth: '2',")
        + textwrap.dedent("""\
        search: {num_samples: 2, space: {lr: {loguniform: [1e-4, 3e-2]}}}
        """)
    )
    spec, configs = plan(path)
    assert spec.train.lr == 1e-3 and spec.train.batch_size == 32
    assert spec.search.space["lr"]["loguniform"] == [1e-4, 3e-2]
    assert all(isinstance(v, float) for v in spec.search.space["lr"]["loguniform"])
    glow = next(c for c in configs if c.model == "glow")
    assert glow.lr == 1e-4 and glow.hparams["depth"] == 2 and glow.batch_size == 32

    args = build_parser().parse_args(
        [
            "train",
            "--model",
            "glow",
            "--lr",
            "1e-4",
            "--budget-steps",
            "1e3",
            "--batch-size",
            "32",
            "--hparam",
            "depth=3",
        ]
    )
    assert args.lr == 1e-4 and args.budget_steps == 1000 and isinstance(args.budget_steps, int)
    assert args.hparam == [("depth", 3)]


def copy_cards(tmp_path) -> Path:
    """An editable copy of the shipped model cards (for FLOWBENCH_MODELS_DIR)."""
    import shutil

    from flowbench.cards import cards_dir

    return Path(shutil.copytree(cards_dir(), tmp_path / "cards"))


def test_a_bad_card_is_one_line_naming_its_file_line_and_key(tmp_path, capsys, monkeypatch):
    cards = copy_cards(tmp_path)
    text = (cards / "glow.yaml").read_text()
    card = re.search(r"  digits:\n    hparams: \{depth: 4,", text)
    assert card, "the glow card's digits entry changed shape: update this test"
    (cards / "glow.yaml").write_text(text.replace(card.group(0), "  digits:\n    hparams: {depth: -4,"))
    monkeypatch.setenv("FLOWBENCH_MODELS_DIR", str(cards))
    line = (cards / "glow.yaml").read_text().splitlines().index(
        "    hparams: {depth: -4, levels: 2, hidden_channels: 32}"
    ) + 1
    rc, err = run_cli([*TRAIN, "--out", str(tmp_path / "out")], capsys)
    assert_one_line(
        rc, err, rf"glow.yaml:{line}: datasets.digits.hparams.depth: Input should be greater than or equal to 1"
    )


def test_a_truncated_table_is_reported_in_one_line(tmp_path, capsys):
    import pandas as pd

    from flowbench.results.tables import REQUIRED, write_table

    folder = tmp_path / "results" / "s"
    path = write_table(pd.DataFrame([{c: 1 for c in REQUIRED["trials"]}]), folder / "trials.parquet", "trials")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, err = run_cli(["report", str(folder)], capsys)
    assert_one_line(rc, err, rf"{re.escape(str(path))}: corrupted or not a Parquet file .*delete it and re-run")


# --------------------------------------------------------------------------- one owner per output
HOLD = textwrap.dedent("""\
    import sys, time
    from flowbench.locks import exclusive_lock
    with exclusive_lock(sys.argv[1], "a test holder"):
        print("held", flush=True)
        time.sleep(120)
    """)


def test_a_second_owner_is_refused_at_once_naming_the_first_and_a_killed_owner_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        with pytest.raises(FlowbenchError) as refused, exclusive_lock(tmp_path, "flowbench train"):
            pass
        assert time.monotonic() - started < 1  # refused at once, not after waiting
        message = str(refused.value)
        assert "\n" not in message
        assert re.match(
            rf"{re.escape(str(tmp_path))} is in use by a test holder \(pid {holder.pid} on \S+, "
            r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
            message,
        ), message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops its lock
        holder.wait()
    with exclusive_lock(tmp_path, "the next owner") as lock:  # taken over, no manual step
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock == tmp_path / LOCK_FILE


def test_one_process_cannot_hold_a_folder_twice(tmp_path):
    with exclusive_lock(tmp_path, "first"):
        with pytest.raises(FlowbenchError, match=r"in use by first \(pid"), exclusive_lock(tmp_path, "second"):
            pass
    with exclusive_lock(tmp_path, "third"):  # released on leaving the block
        pass


def flowbench_command(*argv) -> list[str]:
    return [sys.executable, "-m", "flowbench.cli", *argv]


def wait_until_gone(marker: dict, timeout: float = 120) -> None:
    """Wait until no process has ``marker`` (one environment variable) in its environment."""
    import psutil

    ((name, value),) = marker.items()

    def marked(process: psutil.Process) -> bool:
        try:
            return process.environ().get(name) == value
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
            return False

    deadline = time.time() + timeout
    while any(marked(p) for p in psutil.process_iter()):
        assert time.time() < deadline, f"processes with {name}={value} still running after {timeout} s"
        time.sleep(0.2)


def lock_holder(folder: Path, timeout: float = 120) -> dict:
    """The owner record of ``folder``'s lock once one is written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return json.loads((folder / LOCK_FILE).read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError(f"nobody took {folder}'s lock within {timeout} s")


def test_two_trains_into_one_out_the_second_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    argv = [*TRAIN, "--budget-steps", "100000", "--evaluations", "100", "--out", str(out)]
    first = subprocess.Popen(
        flowbench_command(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        assert lock_holder(out)["pid"] == first.pid
        second = subprocess.run(flowbench_command(*argv), capture_output=True, text=True, timeout=120)
        assert first.poll() is None, first.stderr.read()  # the first trains on, undisturbed
        assert_one_line(
            second.returncode,
            second.stderr,
            rf"^flowbench: error: {re.escape(str(out))} is in use by flowbench train \(pid {first.pid} on ",
        )
        assert second.stdout == ""
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with exclusive_lock(out, "after the kill"):  # the killed trainer's lock is gone with it
        pass


# --------------------------------------------------------------------------- full and read-only disks
def checkpoint_sizes(out: Path) -> int:
    return sum(p.stat().st_size for p in (out / "checkpoint").iterdir())


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, capsys):
    """Room for the first checkpoint but not for a second beside it: the second write fails
    (torch.save's 'unexpected pos'), the first stays whole, and once there is room the same
    command resumes from it."""
    from flowbench.trial import CHECKPOINT_FILE, load_checkpoint

    argv = [*TRAIN, "--budget-steps", "4", "--evaluations", "2"]
    assert run_cli([*argv, "--budget-steps", "2", "--out", str(tmp_path / "probe")], capsys)[0] == 0
    one = checkpoint_sizes(tmp_path / "probe")  # what one checkpoint (state and selected weights) takes
    with mounted_tmpfs(tmp_path / "disk", size="4m") as disk:
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - one - one // 2))  # room for one checkpoint and a half
        out = disk / "out"
        rc, err = run_cli([*argv, "--out", str(out)], capsys)
        assert_one_line(
            rc,
            err,
            rf"^flowbench: error: no space left on device writing {re.escape(str(out))}/checkpoint/"
            r"\S+ \(its previous version is intact\): free space there",
        )
        assert load_checkpoint(out / "checkpoint" / CHECKPOINT_FILE)["progress"]["step"] == 2
        assert not [p for p in (out / "checkpoint").iterdir() if ".tmp" in p.name]
        filler.unlink()
        rc, err = run_cli([*argv, "--out", str(out)], capsys)
        assert rc == 0 and "resuming from" in err
        assert json.loads((out / "record.json").read_text())["steps"] == 4


def test_a_read_only_output_folder_is_one_line_and_keeps_what_it_holds(tmp_path, capsys):
    argv = [*TRAIN, "--budget-steps", "2", "--evaluations", "1"]
    with mounted_tmpfs(tmp_path / "disk", size="8m") as disk:
        out = disk / "out"
        assert run_cli([*argv, "--out", str(out)], capsys)[0] == 0
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        remount_readonly(disk)
        rc, err = run_cli([*argv, "--out", str(out)], capsys)
        assert_one_line(
            rc,
            err,
            rf"^flowbench: error: read-only file system writing {re.escape(str(out))}/\S+: "
            r"give an output folder on a writable disk",
        )
        rc, err = run_cli([*argv, "--out", str(disk / "fresh")], capsys)
        assert_one_line(rc, err, rf"^flowbench: error: read-only file system writing {re.escape(str(disk))}/fresh")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- sweeps (a real local Ray)
from tests.sweep.test_runner import child_runs, local_ray, spec_file  # noqa: E402,F401


@pytest.mark.slow
def test_a_second_driver_is_refused_and_a_killed_driver_resumes_losing_and_duplicating_nothing(tmp_path):
    """One sweep, its driver in trouble three ways. A second driver of the same results is refused at
    once, naming the first, which runs on. Then the first is killed (SIGKILL, its local Ray with it)
    once one trial has finished and another has checkpointed: its lock is left behind and needs no
    cleanup. Run again, it resumes.

    Tune's contract: a trial resumes from the latest checkpoint its driver registered. A trial
    uploads a checkpoint before the driver hears of it, so one stored but not yet registered
    when the driver died is trained again from the one before (at most a checkpoint interval),
    and every evaluation still reaches MLflow exactly once. Tune also deletes the checkpoint
    before a newly registered one at once but saves the state that names it after: a driver
    killed in between leaves a trial whose named checkpoint is gone (it failed CI once). The test
    makes that happen to one trial: it resumes from the newest checkpoint it left, in a second
    experiment."""
    from flowbench.results.tables import read_table
    from flowbench.sweep.experiment import stored_results
    from tests.sweep.test_runner import attempts, final_checkpoint

    spec = spec_file(tmp_path, "killed", seeds=(0, 1), steps=60)
    results = tmp_path / "results"
    tune_dir = results / "killed" / "tune"
    cmd = flowbench_command("sweep", str(spec), "--results", str(results), "--num-cpus", "2")
    first = (tmp_path / "first.out").open("w")
    marker = {"FLOWBENCH_TEST_KILLED_DRIVER": str(tmp_path)}  # inherited by its Ray's processes, trial actors too
    driver = subprocess.Popen(
        cmd, stdout=first, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | marker
    )
    try:
        assert lock_holder(results / "killed")["pid"] == driver.pid
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert driver.poll() is None  # refused without waiting for the first to end
        assert_one_line(
            second.returncode,
            second.stderr,
            rf"^flowbench: error: {re.escape(str(results / 'killed'))} is "
            rf"in use by flowbench sweep killed \(pid {driver.pid} on ",
        )

        def registered() -> dict:
            """Trial id -> the checkpoint Tune's saved state names (trial folders are named by trial
            id; a trial that never reported has neither config nor checkpoint)."""
            (experiment,) = tune_dir.iterdir()
            return {Path(r.path).name: r.checkpoint for r in stored_results(str(tune_dir), experiment.name) or []}

        def unfinished_with_checkpoint(names: dict) -> set:
            # a named checkpoint deleted since (Tune keeps one; its state may lag the storage) cannot resume
            return {
                t for t, c in names.items() if c and Path(c.path).is_dir() and not Path(c.path, "record.json").exists()
            }

        def finished_ones(names: dict) -> set:
            return {t for t, c in names.items() if c is not None and (Path(c.path) / "record.json").is_file()}

        deadline = time.time() + 300
        while time.time() < deadline:  # one trial finished, another one checkpointed, both as Tune's state says
            if list(tune_dir.glob("*/*/checkpoint_*/record.json")):  # on disk first: cheap; the state may lag
                names = registered()
                if finished_ones(names) and unfinished_with_checkpoint(names):
                    break
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        killed_at = time.time()
        driver.wait()
    # its Ray's processes end once they notice: a trial actor may still write a checkpoint until then
    wait_until_gone(marker)
    assert lock_holder(results / "killed")["pid"] == driver.pid  # left behind by the dead driver
    (experiment,) = tune_dir.iterdir()
    names = registered()
    finished = finished_ones(names)
    checkpointed = unfinished_with_checkpoint(names)
    assert finished and checkpointed, "no trial finished and another checkpointed before the deadline"
    # Tune's race, made to happen: the checkpoint the state names is gone, a newer one is there (the
    # same state under the next number; one the trial was uploading when killed, maybe partial, goes)
    lost = min(checkpointed)
    named = Path(names[lost].path)
    for stray in set(named.parent.glob("checkpoint_*")) - {named}:
        shutil.rmtree(stray)
    named.rename(named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}"))

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # the terminal shows flowbench's lines; Ray's start-up box goes to the sweep's log
    assert "Started a local Ray instance" not in rerun.stderr + rerun.stdout
    first.close()  # nor MLflow's INFO lines (it creates the tracking database in the first run)
    assert "INFO" not in (tmp_path / "first.out").read_text()
    assert "Started a local Ray instance" in (results / "killed" / "sweep.log").read_text()
    assert "busy" in rerun.stdout
    # the same experiment, resumed; what Tune failed to restore (the lost checkpoint's trial, and any
    # other the race hit) ran again in one more experiment
    others = [d for d in tune_dir.iterdir() if d != experiment]
    assert len(others) == 1 and (others[0] / lost).is_dir(), (others, rerun.stderr[-3000:])
    again = others[0]

    def last_checkpoint(trial: str) -> Path:
        return final_checkpoint(again if (again / trial).is_dir() else experiment, trial)

    trials = read_table(results / "killed" / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == [f"{m}-digits-seed{s}" for m in ("glow", "nxn_shift") for s in (0, 1)]
    assert (trials.status == "ok").all() and (trials.steps == 60).all()
    for trial in finished:  # finished before the kill: never trained again (at most its record re-reported)
        trained_after_kill = [
            how for how, at in attempts(last_checkpoint(trial), True) if how != "finished already" and at > killed_at
        ]
        assert not trained_after_kill, trial
    for trial in checkpointed:  # interrupted after a checkpoint: continued from it (the lost one: the renamed one)
        assert attempts(last_checkpoint(trial))[-1] == "resumed", (trial, attempts(last_checkpoint(trial)))
    client, parents, children = child_runs(f"sqlite:///{results / 'killed' / 'mlflow.db'}", "killed")
    assert len(parents) == 1 and sorted(c.info.run_name for c in children) == sorted(trials.trial_id)  # one run each
    for child in children:  # every evaluation logged once
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")]
        assert steps == [10, 20, 30, 40, 50, 60], (child.info.run_name, steps)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_card_edit_reruns_exactly_the_trials_it_changes(tmp_path, monkeypatch, caplog):
    """The issue's case: the Glow digits card's depth 4 -> 2 between two runs of one sweep."""
    import logging

    from flowbench.results.tables import read_table
    from flowbench.sweep.driver import run_sweep

    cards = copy_cards(tmp_path)
    monkeypatch.setenv("FLOWBENCH_MODELS_DIR", str(cards))
    narrow = "{levels: 2, hidden_channels: 8}"  # depth: the card's
    spec = spec_file(tmp_path, "cards", overrides={"glow": narrow, "nxn_shift": narrow})
    run_sweep(spec, tmp_path / "results")
    out = tmp_path / "results" / "cards"
    before = read_table(out / "trials.parquet", "trials").set_index("trial_id")
    assert {t: json.loads(h)["depth"] for t, h in before.hparams.items()} == {
        "glow-digits-seed0": 4,
        "nxn_shift-digits-seed0": 4,
    }
    glow = (cards / "glow.yaml").read_text()
    digits = "  digits:\n    hparams: {depth: 4,"
    assert digits in glow, "the glow card's digits entry changed shape: update this test"
    (cards / "glow.yaml").write_text(glow.replace(digits, "  digits:\n    hparams: {depth: 2,"))

    with caplog.at_level(logging.WARNING, logger="flowbench"):
        again = run_sweep(spec, tmp_path / "results")
    assert again.changed == ["glow-digits-seed0"] and again.efficiency["trials_run"] == 1
    said = [r.getMessage() for r in caplog.records if "changed configuration" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "glow-digits-seed0" in said[0]
    after = read_table(out / "trials.parquet", "trials").set_index("trial_id")
    assert sorted(after.index) == sorted(before.index)  # the old glow record is out of the table
    assert json.loads(after.hparams["glow-digits-seed0"])["depth"] == 2
    assert after.finished_at["nxn_shift-digits-seed0"] == before.finished_at["nxn_shift-digits-seed0"]
    (archived,) = again.archive.glob("records/glow-digits-seed0.json")  # archived, not deleted
    (old,) = json.loads(archived.read_text())["trials"]
    assert json.loads(old["row"]["hparams"])["depth"] == 4


@pytest.mark.slow
def test_a_full_tracking_store_costs_one_warning_and_the_next_run_logs_what_it_missed(tmp_path):
    """The MLflow store (sqlite) on a full disk. MLflow is a view of the sweep's records, so SQLite's
    'database or disk is full' costs one warning naming the store and what was not logged; the sweep
    runs on, writes its tables and exits 0. With space again, the next run logs every trial, once."""
    from mlflow.tracking import MlflowClient

    from flowbench.results.tables import read_table

    spec = spec_file(tmp_path, "tracked", seeds=(0,))
    results = tmp_path / "results"
    with mounted_tmpfs(tmp_path / "disk", size="2m") as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        MlflowClient(uri).search_experiments()  # the store's tables exist, as after an earlier sweep
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * free)
        cmd = flowbench_command("sweep", str(spec), "--results", str(results), "--mlflow-uri", uri, "--num-cpus", "1")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        said = [line for line in done.stderr.splitlines() if not line.startswith("[")]  # progress lines aside
        assert len(said) == 1 and "Traceback" not in done.stderr, done.stderr
        assert re.search(
            rf"MLflow tracking store {re.escape(uri)}: no space left on device \(database or disk is full\) "
            r"while logging the sweep's run; .*run the same flowbench sweep again to log what is missing",
            said[0],
        ), said[0]
        assert "incomplete, its store failed" in done.stdout
        trials = read_table(results / "tracked" / "trials.parquet", "trials")
        assert sorted(trials.trial_id) == ["glow-digits-seed0", "nxn_shift-digits-seed0"]
        assert (trials.status == "ok").all()

        (disk / "filler").unlink()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "MLflow" not in again.stderr, again.stderr[-2000:]
        client, parents, children = child_runs(uri, "tracked")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)
        for child in children:  # each trial logged once, from its record: curve, record, samples
            assert child.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")] == [10, 20]
            row = trials.set_index("trial_id").loc[child.info.run_name]
            assert child.data.metrics["final_test_bpd"] == row.test_bpd
            assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["samples.png"]
