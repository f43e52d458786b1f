"""Sweeps on a real two-node Ray cluster on one machine, in private Linux namespaces.

``unshare --net --pid --fork --mount-proc`` gives each cluster a network namespace holding only
its own loopback (Ray's listeners, a moto S3 server, nothing reachable from outside) and a PID
namespace whose processes all die when the script's shell exits: two ``ray start`` (a head and a
worker node, one CPU each, two raylets and object stores), the sweeps as ``flowbench sweep
--address``. The namespace shares the file system, so the results land in ``tmp_path``.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from flowbench.results.tables import read_table
from flowbench.trial import CHECKPOINT_FILE
from tests.sweep.machines import skip_unless_able, unavailable
from tests.sweep.test_runner import child_runs, spec_file

pytestmark = pytest.mark.slow

PORT, S3_PORT = 6379, 5000  # free by construction: the namespace's loopback has nothing else on it
BUCKET = "flowbench"
S3_OPTIONS = f"endpoint_override=127.0.0.1:{S3_PORT}&scheme=http&region=us-east-1"


UNAVAILABLE = unavailable({})

# the two nodes; nodes.json names their Ray node ids, $HEAD_RAYLET/$WORKER_RAYLET their raylets' pids
CLUSTER = f"""\
set -euo pipefail
ip link set lo up
ray start --head --port={PORT} --num-cpus=1 --include-dashboard=false --disable-usage-stats \\
    --temp-dir="$RAY_TMP" > "$OUT/head.log" 2>&1
HEAD_RAYLET=$(pgrep -x raylet)
ray start --address=127.0.0.1:{PORT} --num-cpus=1 > "$OUT/worker.log" 2>&1
WORKER_RAYLET=$(pgrep -x raylet | grep -vx "$HEAD_RAYLET")
python - > "$OUT/nodes.json" <<'EOF'
import json, ray
ray.init(address="127.0.0.1:{PORT}", log_to_driver=False)
print(json.dumps({{("head" if "node:__internal_head__" in n["Resources"] else "worker"): n["NodeID"]
                  for n in ray.nodes() if n["Alive"]}}))
EOF
"""

# moto's S3 API on the namespace's loopback, its bucket created first
S3 = f"""\
moto_server -H 127.0.0.1 -p {S3_PORT} > "$OUT/moto.log" 2>&1 &
python - <<'EOF'
import time
from pyarrow import fs
s3 = fs.S3FileSystem(endpoint_override="127.0.0.1:{S3_PORT}", scheme="http", region="us-east-1",
                     allow_bucket_creation=True, connect_timeout=1, request_timeout=2)
for _ in range(120):
    try:
        s3.create_dir("{BUCKET}")
        break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("moto_server did not answer within 60 s")
EOF
"""


def run_in_cluster(out: Path, body: str, timeout: float = 900, env: dict | None = None) -> dict:
    """Run ``body`` after CLUSTER inside fresh namespaces; returns nodes.json. Everything the
    script started ends with it (--kill-child ends the namespace's init if the test times out)."""
    ray_tmp = tempfile.mkdtemp(prefix="fbray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    script = out / "cluster.sh"
    script.write_text(CLUSTER + textwrap.dedent(body))
    bin_dir = str(Path(sys.executable).parent)  # ray, flowbench, moto_server of this environment
    env = (
        os.environ
        | {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "OUT": str(out),
            "RAY_TMP": ray_tmp,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
        | (env or {})
    )
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", str(script)],
            env=env,
            cwd=out,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")) if p.name != "moto.log"
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{logs}"
    return json.loads((out / "nodes.json").read_text())


def attempts(storage: Path, trial: str) -> list[dict]:
    """The attempts a trial's latest checkpoint in a local storage folder carries."""
    (path,) = storage.glob(f"*/{trial}/checkpoint_*/attempts.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


# a checkpoint of a trial training on the worker node, not its last: the worker node's raylet killed
KILL_THE_WORKER = """\
python - "$WORKER_RAYLET" > "$OUT/killed.json" <<'EOF'
import json, os, signal, sys, time
from pathlib import Path
worker = json.loads(Path(os.environ["OUT"], "nodes.json").read_text())["worker"]
storage = Path(os.environ["OUT"], "results", "lost", "tune")
deadline = time.time() + 600
while time.time() < deadline:
    for path in storage.glob("*/*/checkpoint_*/attempts.jsonl"):
        try:
            lines = [json.loads(l) for l in path.read_text().splitlines()]
        except (OSError, ValueError):  # being written or rotated
            continue
        if lines and lines[-1]["node"] == worker and not (path.parent / "record.json").exists():
            os.kill(int(sys.argv[1]), signal.SIGKILL)
            print(json.dumps({"trial": path.parent.parent.name, "at": time.time()}))
            raise SystemExit
    time.sleep(0.1)
raise SystemExit("no trial checkpointed on the worker node within 600 s")
EOF
"""


@pytest.fixture(scope="module")
def two_node_sweeps(tmp_path_factory):
    """One cluster, three sweeps: a grid sweep with Tune's storage in S3 (moto), a search sweep
    with Tune's storage in a local folder that both nodes see, and last a grid sweep whose worker
    node is killed (its raylet, once a trial running there has checkpointed). The GCS declares a
    node dead after three missed health checks a second apart, not Ray's default of a minute."""
    skip_unless_able(UNAVAILABLE)
    out = tmp_path_factory.mktemp("two-nodes")
    # glow and nxn_shift, evaluations every 10 steps; Tune asks for both nodes' slots at the start
    spec_file(out, "grid", seeds=(0, 1), steps=30)
    spec_file(
        out,
        "search",
        models=("glow",),
        seeds=(0, 1),
        extra="""\
        search:
          num_samples: 2
          space: {lr: {loguniform: [1.0e-4, 3.0e-3]}}
        """,
    )
    spec_file(out, "lost", seeds=(0, 1), steps=200, extra="max_failures: 2\n")
    text = (out / "lost.yaml").read_text().replace("evaluations: 20", "evaluations: 10")
    (out / "lost.yaml").write_text(text)
    nodes = run_in_cluster(
        out,
        S3
        + textwrap.dedent(f"""\
        flowbench sweep "$OUT/grid.yaml" --address 127.0.0.1:{PORT} --results "$OUT/results" \\
            --storage "s3://{BUCKET}/tune?{S3_OPTIONS}" > "$OUT/grid.log" 2>&1
        python - > "$OUT/bucket.json" <<'EOF'
        import json
        from pyarrow import fs
        s3, path = fs.FileSystem.from_uri("s3://{BUCKET}/tune?{S3_OPTIONS}")
        print(json.dumps([f.path for f in s3.get_file_info(fs.FileSelector(path, recursive=True))]))
        EOF
        flowbench sweep "$OUT/search.yaml" --address 127.0.0.1:{PORT} --results "$OUT/results" \\
            --storage "$OUT/shared-storage" > "$OUT/search.log" 2>&1
        flowbench sweep "$OUT/lost.yaml" --address 127.0.0.1:{PORT} --results "$OUT/results" > "$OUT/sweep.log" 2>&1 &
        SWEEP=$!
        """)
        + KILL_THE_WORKER
        + "wait $SWEEP\n",
        env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"},
    )
    return out, nodes


def test_grid_sweep_on_two_nodes_with_s3_storage(two_node_sweeps):
    out, nodes = two_node_sweeps
    assert set(nodes) == {"head", "worker"} and nodes["head"] != nodes["worker"]
    trials = read_table(out / "results" / "grid" / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == sorted(f"{m}-digits-seed{s}" for m in ("glow", "nxn_shift") for s in (0, 1))
    assert (trials.status == "ok").all() and (trials.steps == 30).all()
    assert set(trials.node) == {nodes["head"], nodes["worker"]}  # both nodes trained

    # every trial's state lives in the bucket, none in a local tune/ folder
    assert not (out / "results" / "grid" / "tune").exists()
    files = json.loads((out / "bucket.json").read_text())
    for trial in trials.trial_id:
        final = {Path(f).name for f in files if f"/{trial}/checkpoint_" in f}
        assert {CHECKPOINT_FILE, "record.json", "attempts.jsonl", "samples.png", "reconstructions.png"} <= final, (
            trial,
            final,
        )
    # the driver fetched the figures of every trial from S3, those of the worker's trials included
    for trial in trials.trial_id:
        assert (out / "results" / "grid" / "figures" / f"samples-{trial}.png").stat().st_size > 0

    client, parents, children = child_runs(f"sqlite:///{out / 'results' / 'grid' / 'mlflow.db'}", "grid")
    assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)
    node_of = dict(zip(trials.trial_id, trials.node, strict=True))
    on_worker = [c for c in children if node_of[c.info.run_name] == nodes["worker"]]
    assert on_worker
    for child in on_worker:  # complete: finished, full curve, final figures and its node
        assert child.info.status == "FINISHED" and child.data.tags["node"] == nodes["worker"]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")] == [10, 20, 30]
        assert "samples.png" in [a.path for a in client.list_artifacts(child.info.run_id)]


def test_search_sweep_on_two_nodes_with_a_shared_folder(two_node_sweeps):
    out, nodes = two_node_sweeps
    trials = read_table(out / "results" / "search" / "trials.parquet", "trials")
    search, final = trials[trials.phase == "search"], trials[trials.phase == "final"]
    assert len(search) == 2 and search.lr.nunique() == 2  # two Optuna samples
    assert sorted(final.trial_id) == ["glow-digits-seed0", "glow-digits-seed1"]
    assert (trials.status == "ok").all() and (trials.steps == 20).all()
    assert set(trials.node) == {nodes["head"], nodes["worker"]}
    storage = out / "shared-storage"
    for trial in final.trial_id:  # each final trial's last checkpoint is in the folder every node sees
        (checkpoint,) = storage.rglob(f"{trial}/checkpoint_*/{CHECKPOINT_FILE}")
        assert checkpoint.stat().st_size > 0
    client, _, children = child_runs(f"sqlite:///{out / 'results' / 'search' / 'mlflow.db'}", "search")
    assert len(children) == len(trials) and all(c.info.status == "FINISHED" for c in children)


def test_a_lost_worker_node_costs_no_trial(two_node_sweeps):
    """The worker node's raylet killed once a trial running there has checkpointed: the sweep ends
    with every trial ok, the lost one resumed on the head from its last checkpoint, nothing
    trained twice and nothing logged twice."""
    folder, nodes = two_node_sweeps
    killed = json.loads((folder / "killed.json").read_text())
    out = folder / "results" / "lost"
    trials = read_table(out / "trials.parquet", "trials")
    assert len(trials) == 4 and trials.trial_id.is_unique
    assert (trials.status == "ok").all() and (trials.steps == 200).all()

    lost = attempts(out / "tune", killed["trial"])
    assert [a["node"] for a in lost] == [nodes["worker"], nodes["head"]]  # started there, finished here
    assert [a["how"] for a in lost] == ["fresh", "resumed"] and lost[1]["at"] > killed["at"]
    assert trials.set_index("trial_id").node[killed["trial"]] == nodes["head"]

    curves = read_table(out / "curves.parquet", "curves")
    every_eval = list(range(20, 201, 20))
    for trial, steps in curves.groupby("trial_id").step:
        assert sorted(steps) == every_eval, trial  # no evaluation lost, none twice
    client, _, children = child_runs(f"sqlite:///{out / 'mlflow.db'}", "lost")
    assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)  # one run per trial
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")] == every_eval
