"""The sweep driver under load (issue #14 item 5): a sweep of many short trials on a few slots.

    python benchmarks/bench_load.py [--trials 200 --steps 4 --slots 2]

Writes a temporary spec (a tiny Glow on the digits, one trial per seed 0..N-1, a few steps
each) and runs it with ``flowbench.sweep.driver.run_sweep`` in this process, on a local Ray of
``--slots`` CPUs whose temporary folder and results folder are private to the run. Reports:

- the driver's overhead per trial: (wall × slots − the trials' busy seconds) / trials, from the
  efficiency the driver itself records in sweep.json (wall from the sweep's start to the end of
  its Tune experiment, busy from each trial's start in its worker to its record), and the same
  over the whole ``run_sweep`` call (collecting the records, tables, report and MLflow included);
- the driver process's peak memory: VmHWM (the kernel's peak resident set) and RssAnon (anonymous
  memory, sampled every 0.1 s) with its growth from before the sweep to after it;
- the driver's memory growth per trial: the slope of RssAnon against the number of trials ended,
  read as each trial ends (a least-squares line over the second half of the trials, past start-up);
- that every trial is ok and recorded once: trials.parquet holds exactly the planned trial ids,
  each once, all with status ``ok``. The exit status is non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


def status_kb(field: str) -> int:
    """A field of this process's /proc/self/status, in kB (e.g. VmHWM, RssAnon)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler(threading.Thread):
    """The largest value of a /proc/self/status field seen while running."""

    def __init__(self, field: str, interval: float = 0.1):
        super().__init__(daemon=True, name=f"sample-{field}")
        self.field, self.interval, self.peak = field, interval, status_kb(field)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, status_kb(self.field))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, status_kb(self.field))
        return self.peak


def trial_end_sampler(planned: int):
    """A Tune callback that reads RssAnon each time a trial ends: (trials ended, kB) pairs; with
    tracemalloc tracing, it also takes a snapshot of Python's allocations at the middle trial and the last."""
    from ray import tune

    class RssPerTrial(tune.Callback):
        def __init__(self):
            self.points: list[tuple[int, int]] = []
            self.snapshots: dict[int, tracemalloc.Snapshot] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.points.append((len(self.points) + 1, status_kb("RssAnon")))
            if tracemalloc.is_tracing() and len(self.points) in (planned // 2, planned):
                self.snapshots[len(self.points)] = tracemalloc.take_snapshot()

        on_trial_error = on_trial_complete

    return RssPerTrial()


def growth_per_trial(points: list[tuple[int, int]]) -> float:
    """MiB a trial: the least-squares slope of RssAnon over the second half of the trials."""
    late = points[len(points) // 2 :]
    if len(late) < 2:
        return float("nan")
    n = len(late)
    mx, my = sum(x for x, _ in late) / n, sum(y for _, y in late) / n
    sxx = sum((x - mx) ** 2 for x, _ in late)
    return sum((x - mx) * (y - my) for x, y in late) / sxx / 1024


def write_spec(folder: Path, name: str, trials: int, steps: int) -> Path:
    spec = folder / f"{name}.yaml"
    spec.write_text(f"""name: {name}
models: [glow]
datasets: [digits]
seeds: [{", ".join(str(s) for s in range(trials))}]
budget: {{steps: {steps}}}
train: {{batch_size: 16, evaluations: 1, eval_images: 64}}
overrides:
  glow: {{depth: 2, levels: 2, hidden_channels: 8}}
resources: {{cpu: 1}}
latency: {{batch_sizes: [1], rounds: 2, warmup: 0}}
""")
    return spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--steps", type=int, default=4, help="training steps per trial")
    p.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray: trials at once")
    p.add_argument("--keep", action="store_true", help="keep the results folder (its path is printed)")
    p.add_argument(
        "--tracemalloc",
        type=int,
        metavar="FRAMES",
        default=0,
        help="trace Python's allocations (FRAMES deep; slower): print where the driver's Python heap grew "
        "between the middle trial and the last",
    )
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fbload-"))
    # a Ray of our own: its sockets and session under our folder (a short path: socket names are
    # limited), and no RAY_ADDRESS, so no other Ray on the machine is joined
    os.environ["RAY_TMPDIR"] = str(work / "ray")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    (work / "ray").mkdir()

    import pandas as pd
    import ray

    from flowbench.sweep.driver import run_sweep

    name = "load"
    spec = write_spec(work, name, args.trials, args.steps)
    rss_anon_before = status_kb("RssAnon")
    sampler = PeakSampler("RssAnon")
    sampler.start()
    per_trial = trial_end_sampler(args.trials)
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    started = time.time()
    try:
        run_sweep(spec, work / "results", num_cpus=args.slots, callbacks=(per_trial,))
    finally:
        total_wall = time.time() - started
        peak_anon = sampler.stop()
        ray.shutdown()
    rss_anon_after, hwm = status_kb("RssAnon"), status_kb("VmHWM")

    out = work / "results" / name
    trials = pd.read_parquet(out / "trials.parquet")
    last_run = json.loads((out / "sweep.json").read_text())["last_run"]
    planned = {f"glow-digits-seed{s}" for s in range(args.trials)}
    problems = []
    if len(trials) != args.trials:
        problems.append(f"{len(trials)} rows in trials.parquet, {args.trials} planned")
    if trials.trial_id.duplicated().any():
        problems.append(f"trial ids recorded twice: {sorted(trials.trial_id[trials.trial_id.duplicated()])[:5]}")
    if set(trials.trial_id) != planned:
        problems.append(
            f"missing {sorted(planned - set(trials.trial_id))[:5]}, "
            f"unplanned {sorted(set(trials.trial_id) - planned)[:5]}"
        )
    if not (trials.status == "ok").all():
        problems.append(f"status not ok: {trials.status[trials.status != 'ok'].value_counts().to_dict()}")
    if last_run["trials_run"] != args.trials:
        problems.append(f"sweep.json says {last_run['trials_run']} trials ran")

    ran, slots, busy = last_run["trials_run"] or 1, last_run["slots"], last_run["busy_seconds"]
    print(
        f"load run: {args.trials} trials of {args.steps} steps (glow K=2 L=2 width 8 on digits), {slots} slots, "
        f"{os.cpu_count()} CPUs on the machine"
    )
    print(
        f"  experiment wall {last_run['wall_seconds']:.1f} s, run_sweep wall {total_wall:.1f} s, "
        f"trials busy {busy:.1f} s ({busy / ran:.2f} s a trial), efficiency {last_run['efficiency']:.2f}"
    )
    print(
        f"  driver overhead per trial: {(last_run['wall_seconds'] * slots - busy) / ran:.2f} s slot time "
        f"(experiment), {(total_wall * slots - busy) / ran:.2f} s (whole run_sweep: + tables, report, MLflow)"
    )
    print(
        f"  driver process memory: peak resident (VmHWM) {hwm / 1024:.0f} MiB, peak anonymous (RssAnon) "
        f"{peak_anon / 1024:.0f} MiB; RssAnon {rss_anon_before / 1024:.0f} MiB before the sweep, "
        f"{rss_anon_after / 1024:.0f} MiB after"
    )
    ends = per_trial.points
    if ends:
        half = ends[len(ends) // 2]
        print(
            f"  driver memory growth: {growth_per_trial(ends):.3f} MiB a trial (RssAnon as trials end, trials "
            f"{half[0]}-{ends[-1][0]}: {half[1] / 1024:.0f} -> {ends[-1][1] / 1024:.0f} MiB)"
        )
    if len(per_trial.snapshots) == 2:
        (middle, half), (last, end) = sorted(per_trial.snapshots.items())
        grown = end.compare_to(half, "traceback")
        total = sum(d.size_diff for d in grown)
        print(
            f"  Python heap growth (tracemalloc), trials {middle}-{last}: "
            f"{total / (last - middle) / 1024:.1f} KiB a trial; largest:"
        )
        for diff in grown[:12]:
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in diff.traceback)
            print(
                f"    {diff.size_diff / (last - middle) / 1024:8.2f} KiB a trial  {diff.count_diff:+7d} blocks  {where}"
            )
    print(
        f"  trials.parquet: {len(trials)} rows, {trials.trial_id.nunique()} unique trial ids, status "
        f"{trials.status.value_counts().to_dict()}: " + ("; ".join(problems) if problems else "all ok, each once")
    )
    if args.keep:
        print(f"  results kept in {out}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
