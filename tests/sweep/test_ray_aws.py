"""Ray's cluster launcher with the shipped cluster.yaml and Ray's `aws` provider, for real against a simulated AWS:
moto's server is EC2, IAM and S3, and tests/sweep/aws.py plays EC2's network and cloud-init, giving each instance
moto launches a machine (tests/sweep/machines.py: an OpenSSH server for user `ubuntu` in PID, mount and network
namespaces of its own, its private and public addresses on its own interface on the session's bridge). One session
types the operator's path of cluster.yaml's comments: `ray up`, a sweep through `ray job submit` over `ray
dashboard`'s tunnel with `--storage` in the bucket, `ray exec … 'ray status'`, `ray rsync-down`, `ray down`. The
head's autoscaler launches the GPU worker the sweep's trials ask for (the head has no CPU for them).

What cannot exist here is overridden, and only that (`aws_config` and the session's environment):
- `docker:` removed: Ray's image cannot be pulled (no registry but PyPI's and Debian's, no Docker daemon). The
  setup and start commands then run on the instance as shipped, with the image's Python (aws.py's make_image:
  this environment's packages, Ray's and pip's commands) and offline (PIP_NO_INDEX on the instances);
- the security group of the line marked EDIT: the one the operator makes as the file says (aws.py's prepare);
- the endpoint (AWS_ENDPOINT_URL, which botocore and pyarrow read) and dummy credentials, for the operator and,
  in place of the instance profile's, for the instances; moto loads AWS's managed policies
  (MOTO_IAM_LOAD_MANAGED_POLICIES) so that Ray can attach them to its role;
- the operator's home and temporary folder are the session's (Ray keeps its key pair and config cache there).
Provider, node types, IAM profile, tags, file mounts, setup and start commands run as shipped.
"""

import contextlib
import hashlib
import json
import re
import shutil
from getpass import getuser
from pathlib import Path

import pytest

from flowbench.results.tables import read_table
from tests.sweep.aws import BUCKET, MOTO_PORT, OPERATOR_NETWORK
from tests.sweep.machines import (
    ROOT,
    ray_left,
    run_session,
    session_folder,
    skip_unless_able,
    step_seconds,
    unavailable,
)
from tests.sweep.test_runner import child_runs

pytestmark = pytest.mark.slow

TOOLS = {"sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync", "nsenter": "util-linux"}
UNAVAILABLE = unavailable(TOOLS)

OPERATOR_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def aws_config() -> str:
    """cluster.yaml with the overrides above: its `docker:` block removed, and its EDIT line's group left for
    aws.py's prepare to fill in (OPERATOR_GROUP) once moto has made it."""
    text = (ROOT / "cluster.yaml").read_text()
    docker = re.search(r"^docker:\n(?:[ #].*\n)*\n", text, re.M)
    assert docker, "no docker: block"
    text = text.replace(docker.group(0), "")
    (edit,) = [line for line in text.splitlines() if "# EDIT" in line]
    assert "SecurityGroupIds" in edit, edit
    return text.replace(edit, re.sub(r"\[sg-[0-9a-f]+\]", "[OPERATOR_GROUP]", edit.split("#")[0].rstrip()))


# two trials of a tiny flow on the digits, one CPU each: the head has none, so they need a worker
SPEC = """\
name: aws
models: [glow]
datasets: [digits]
seeds: [0, 1]
budget: {steps: 10}
train: {batch_size: 32, evaluations: 1}
overrides:
  glow: {depth: 2, levels: 2, hidden_channels: 8}
resources: {cpu: 1}
latency: {batch_sizes: [1, 4], rounds: 2, warmup: 1}
"""

# the operator's path of cluster.yaml's comments; what moto holds is written down after `ray up`, after the
# sweep and after `ray down`
SESSION = f"""\
mkdir -p /run/sshd "$OUT/keys" "$OUT/job" "$OUT/local" "$HOME"
# the operator's checkout: what Ray syncs of this one. Ray hashes every file below a file mount's source at each
# `ray up`, what its rsync filter leaves out included (hash_runtime_conf): this checkout's .venv is 2.4 GB
rsync -a --filter='dir-merge,- .gitignore' --exclude=/.git "$ROOT/" "$OUT/checkout/"
cd "$OUT/checkout"
ssh-keygen -q -t ed25519 -N '' -f "$OUT/keys/host"
MOTO_IAM_LOAD_MANAGED_POLICIES=true moto_server -H 0.0.0.0 -p {MOTO_PORT} > "$OUT/moto.log" 2>&1 &
python -m tests.sweep.aws prepare "$CONFIG"
seconds moto
python -m tests.sweep.aws cloud-init > "$OUT/cloud-init.log" 2>&1 &
cloud_init=$!

ray up -y "$CONFIG" > "$OUT/up.log" 2>&1
seconds up
python -m tests.sweep.aws snapshot > "$OUT/moto-up.json"

setsid ray dashboard "$CONFIG" > "$OUT/dashboard.log" 2>&1 &
tunnel=$!
python -c '
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=5)
        break
    except OSError:
        time.sleep(0.5)'
ray job submit --address http://127.0.0.1:8265 --working-dir "$OUT/job" -- flowbench sweep aws.yaml \\
    --address auto --storage s3://{BUCKET}/sweeps --results '~/results' > "$OUT/job.log" 2>&1
seconds job
python -c '
import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:8265/api/v0/nodes?limit=100", timeout=10).read().decode())' \\
    > "$OUT/nodes.json"
for machine in "$OUT"/ip-*/; do  # what listens on each instance's network
    nsenter --net=/proc/$(cat "$machine/net-pid")/ns/net ss -ltnH > "$machine/listeners.txt"
done
ray exec "$CONFIG" 'ray status' > "$OUT/status.log" 2>&1
ray rsync-down "$CONFIG" '~/results/aws/' "$OUT/local/aws" > "$OUT/rsync.log" 2>&1
seconds rsync-down
kill -- -$tunnel
python -m tests.sweep.aws snapshot > "$OUT/moto-job.json"

ray down -y "$CONFIG" > "$OUT/down.log" 2>&1
seconds down
# cloud-init ends each machine once moto says its instance is terminated
for _ in $(seq 60); do
    [ -z "$(ray_processes)" ] && ! pgrep -x sshd > /dev/null && break
    sleep 1
done
seconds machines-ended
ray_processes > "$OUT/ray-after-down.txt"
{{ pgrep -ax sshd || true; }} > "$OUT/sshd-after-down.txt"
kill $cloud_init
python -m tests.sweep.aws snapshot > "$OUT/moto-down.json"
"""


@pytest.fixture(scope="module")
def aws():
    """One AWS cluster's life, as cluster.yaml's operator lives it."""
    skip_unless_able(UNAVAILABLE)  # every test here takes this fixture
    # the SSH connections' shared sockets, the operator's and the head's: fixed folders of Ray's, removed after
    # unless they were there before
    cluster = hashlib.sha256(b"flowbench").hexdigest()[:10]
    controls = [
        Path("/tmp", "ray_ssh_" + hashlib.sha256(user.encode()).hexdigest()[:10], cluster)
        for user in {getuser(), "ubuntu"}
    ]
    had = {control: control.exists() for control in controls}
    try:
        with session_folder("fbaws-") as out:
            (out / "cluster.yaml").write_text(aws_config())
            (out / "job").mkdir()
            (out / "job" / "aws.yaml").write_text(SPEC)
            env = OPERATOR_ENV | {
                "CONFIG": str(out / "cluster.yaml"),
                "HOME": str(out / "operator"),  # Ray writes its key pair's private key to ~/.ssh
                "RAY_TMPDIR": str(out / "client"),  # the cluster state `ray up` keeps where it is typed
            }
            run_session(out, SESSION, env, timeout=900)
            yield out
    finally:
        for control, existed in had.items():
            if not existed:
                shutil.rmtree(control, ignore_errors=True)
                with contextlib.suppress(OSError):
                    control.parent.rmdir()  # if empty


def moto(out: Path, when: str) -> dict:
    return json.loads((out / f"moto-{when}.json").read_text())


def by_kind(instances: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for instance in instances:
        kinds.setdefault(instance["tags"]["ray-node-type"], []).append(instance)
    return kinds


def status_of(log: str) -> tuple[dict[str, int], dict[str, float]]:
    """The live nodes per node type (active or idle) and the cluster's total resources in `ray status`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log)
    nodes: dict[str, int] = {}
    for block in re.findall(r"(?:Active|Idle):\n((?: \d+ \S+\n)+)", text):
        for count, node_type in (line.split() for line in block.splitlines()):
            nodes[node_type] = nodes.get(node_type, 0) + int(count)
    totals = {name: float(total) for total, name in re.findall(r"^ [\d.]+/([\d.]+) (\w+)$", text, re.M)}
    return nodes, totals


def address_of(instance: dict) -> str:
    """Its machine's folder in the session."""
    return "ip-" + instance["private_ip"].replace(".", "-")


def test_ray_up_launches_the_head_as_configured(aws):
    (head,) = moto(aws, "up")["instances"]  # `ray up` launches the head alone
    assert head["state"] == "running" and head["type"] == "m5.2xlarge"
    tags = {"ray-cluster-name": "flowbench", "ray-node-type": "head", "ray-user-node-type": "head"}
    assert {key: head["tags"].get(key) for key in tags} == tags
    assert head["image"].startswith("resolve:ssm:/aws/service/deeplearning/")
    assert head["key"] == "ray-autoscaler_us-west-2" and head["profile"].endswith("/ray-autoscaler-v1")
    # the profile Ray made, with the role and the policies that let the head launch workers and reach S3
    profile = moto(aws, "up")["profiles"]["ray-autoscaler-v1"]
    assert profile["roles"] == {
        "ray-autoscaler-v1": [
            "arn:aws:iam::aws:policy/AmazonEC2FullAccess",
            "arn:aws:iam::aws:policy/AmazonS3FullAccess",
        ]
    }


def test_ssh_comes_in_from_the_operators_network_only(aws):
    state = moto(aws, "job")
    (group,) = [g for g in state["groups"] if g["name"] == "flowbench"]  # the group of the EDIT line
    assert {i["id"]: i["groups"] for i in state["instances"]} == {i["id"]: [group["id"]] for i in state["instances"]}
    ssh = [p for p in group["ingress"] if p.get("FromPort") == 22]
    assert [r["CidrIp"] for p in ssh for r in p["IpRanges"]] == [OPERATOR_NETWORK]
    assert [pair["GroupId"] for p in group["ingress"] for pair in p["UserIdGroupPairs"]] == [group["id"]]
    # Ray made no group of its own (its default lets SSH in from anywhere), and no group lets SSH in from anywhere
    assert not [g for g in state["groups"] if g["name"].startswith("ray-autoscaler")]
    open_to_all = [
        g["name"] for g in state["groups"] for p in g["ingress"] for r in p["IpRanges"] if r["CidrIp"] == "0.0.0.0/0"
    ]
    assert open_to_all == []


def test_the_heads_autoscaler_launches_a_gpu_worker_for_the_sweep(aws):
    kinds = by_kind(moto(aws, "job")["instances"])
    (head,), (worker,) = kinds["head"], kinds["worker"]
    assert worker["type"] == "g5.2xlarge" and worker["tags"]["ray-user-node-type"] == "gpu_worker"
    assert worker["profile"].endswith("/ray-autoscaler-v1") and worker["key"] == head["key"]
    nodes, totals = status_of((aws / "status.log").read_text())  # `ray exec … 'ray status'`
    assert nodes == {"head": 1, "gpu_worker": 1}
    # the worker's Ray advertises what EC2 lists for a g5.2xlarge (8 vCPUs, an A10G), the head none: the
    # autoscaler passes the node type's resources to `ray start`; the test's trials ask for CPUs only
    assert totals["CPU"] == 8 and totals["GPU"] == 1, totals
    # the dashboard and the jobs API listen on the head's loopback only, in the head's network: the job reached
    # them through `ray dashboard`'s tunnel, the only way from the operator's network to that port
    listeners = (aws / address_of(head) / "listeners.txt").read_text().splitlines()
    assert {line.split()[3] for line in listeners if line.split()[3].endswith(":8265")} == {"127.0.0.1:8265"}


def test_the_sweep_trains_on_the_worker_with_its_storage_in_s3(aws):
    log = (aws / "job.log").read_text()
    assert "sweep aws: 2 trials (2 ok)" in log and "succeeded" in log, log[-3000:]
    nodes = json.loads((aws / "nodes.json").read_text())["data"]["result"]["result"]
    ip_of = {n["node_id"]: n["node_ip"] for n in nodes}
    (worker,) = by_kind(moto(aws, "job")["instances"])["worker"]
    trials = read_table(aws / "local" / "aws" / "trials.parquet", "trials")
    assert len(trials) == 2 and (trials.status == "ok").all()
    assert {ip_of[node] for node in trials.node} == {worker["private_ip"]}
    keys = moto(aws, "job")["keys"]
    for trial in trials.trial_id:  # each trial's checkpoints are in the bucket
        assert [k for k in keys if k.startswith("sweeps/") and f"/{trial}/checkpoint_" in k], (trial, keys[:20])


def test_rsync_down_brings_back_the_tables(aws):
    local = aws / "local" / "aws"
    for name in ("trials.parquet", "curves.parquet", "table2.parquet", "report.md", "mlflow.db"):
        assert (local / name).stat().st_size > 0, name
    trials = read_table(local / "trials.parquet", "trials")
    _, parents, children = child_runs(f"sqlite:///{local / 'mlflow.db'}", "aws")
    assert len(parents) == 1 and sorted(c.info.run_name for c in children) == sorted(trials.trial_id)


def test_ray_down_terminates_every_instance_and_leaves_no_process(aws):
    instances = moto(aws, "down")["instances"]
    assert len(instances) == 2 and {i["state"] for i in instances} == {"terminated"}
    assert ray_left(aws / "ray-after-down.txt") == []
    assert (aws / "sshd-after-down.txt").read_text() == ""
    print("seconds from the session's start:", step_seconds(aws))
