"""Ray's cluster launcher with cluster-onprem.yaml, for real: two OpenSSH servers on one machine are the
head (127.0.0.2) and the worker (127.0.0.3) (tests/sweep/machines.py), and one session types the README's
operator path: `ray up`, `ray up` again, a sweep of the user's own spec through `ray job submit
--working-dir` over `ray dashboard`'s tunnel, `ray rsync-down`, `flowbench report`, `ray exec … 'ray
status'`, `ray down`.
"""

import contextlib
import hashlib
import json
import re
import shutil
import sysconfig
from getpass import getuser
from pathlib import Path

import pytest

from flowbench.results.tables import read_table
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

UNAVAILABLE = unavailable({"sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync"})


def onprem_config(key: Path) -> str:
    """cluster-onprem.yaml with its lines marked EDIT edited, as a user edits them, for these two machines."""
    edits = {"head_ip": "127.0.0.2", "worker_ips": "[127.0.0.3]", "ssh_user": "root", "ssh_private_key": str(key)}
    lines = []
    for line in (ROOT / "cluster-onprem.yaml").read_text().splitlines():
        if "# EDIT" in line:
            key_name = line.split(":")[0]
            line = f"{key_name}: {edits.pop(key_name.strip())}"
        lines.append(line)
    assert not edits, f"no line marked EDIT for {sorted(edits)}"
    return "\n".join(lines) + "\n"


# Each machine: an sshd that takes the session's key for root, in namespaces of its own. Its flowbench
# environment already exists, as after a first `ray up`: ~/flowbench-env, a venv that reuses this environment's
# packages (a .pth line, as tests/test_wheel.py does: offline and fast) with Ray's command; the config's setup
# then installs the synced checkout into it, offline (SetEnv: PIP_NO_INDEX, and PIP_NO_BUILD_ISOLATION=0, which
# means no isolation: setuptools from those packages).
# RAY_gcs_rpc_server_reconnect_timeout_s: a worker that lost its head ends its raylet after 10 s, not Ray's 60.
MACHINES = """\
mkdir -p /run/sshd "$OUT/keys"  # sshd's privilege separation folder, as its Debian service makes it
ssh-keygen -q -t ed25519 -N '' -f "$OUT/keys/host"
ssh-keygen -q -t ed25519 -N '' -f "$OUT/keys/user"
cp "$OUT/keys/user.pub" "$OUT/keys/authorized_keys"
machine_env="PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 RAY_USAGE_STATS_ENABLED=0"
machine_env+=" RAY_gcs_rpc_server_reconnect_timeout_s=10"
for node in head:127.0.0.2 worker:127.0.0.3; do
    name=${node%%:*} ip=${node#*:}
    env=$OUT/$name/home/flowbench-env
    mkdir -p "$OUT/$name/home"
    python -m venv --without-pip "$env"
    echo "$SITE_PACKAGES" > "$env/lib/python$PYTHON_VERSION/site-packages/reuse.pth"
    printf '#!%s\\nimport sys\\nfrom ray.scripts.scripts import main\\nsys.exit(main())\\n' "$env/bin/python" \\
        > "$env/bin/ray"
    chmod +x "$env/bin/ray"
    cat > "$OUT/$name/sshd_config" <<EOF
ListenAddress $ip
HostKey $OUT/keys/host
PidFile $OUT/$name/sshd.pid
AuthorizedKeysFile $OUT/keys/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv $machine_env
EOF
    machine "$name" "$ip" /usr/sbin/sshd -D -f "$OUT/$name/sshd_config" -E "$OUT/$name/sshd.log"
done

alive() {  # the alive nodes, asked of the head's dashboard (Ray's state API) until there are $1: JSON
    python - "$1" <<'EOF'
import json, sys, time, urllib.request
deadline = time.time() + 300
while time.time() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8265/api/v0/nodes?limit=100", timeout=10) as answer:
            nodes = json.load(answer)["data"]["result"]["result"]
    except OSError:
        nodes = []
    alive = [{"id": n["node_id"], "ip": n["node_ip"]} for n in nodes if n["state"] == "ALIVE"]
    if len(alive) == int(sys.argv[1]):
        print(json.dumps(alive))
        sys.exit(0)
    time.sleep(1)
sys.exit(f"not {sys.argv[1]} alive nodes within 300 s: {nodes}")
EOF
}
"""

# Four trials on the cluster's four slots (two CPUs a machine, both up before the job: `alive 2`): Tune asks for
# every slot at once, so Ray places two trials on each machine, and on a cluster of several nodes each trial trains
# where it was placed (sweep/experiment.py: no actor reuse across nodes), however long a machine takes to start them.
SPEC = """\
name: onprem
models: [glow, nxn_shift]
datasets: [digits]
seeds: [0, 1]
budget: {steps: 20}
train: {batch_size: 32, evaluations: 2}
overrides:
  glow: {depth: 2, levels: 2, hidden_channels: 8}
  nxn_shift: {depth: 2, levels: 2, hidden_channels: 8}
resources: {cpu: 1}
latency: {batch_sizes: [1, 4], rounds: 2, warmup: 1}
"""

# the README's operator path
SESSION = """\
ray up -y "$CONFIG" > "$OUT/up.log" 2>&1
seconds up
alive 2 > "$OUT/nodes-up.json"
seconds worker-up
ray up -y "$CONFIG" > "$OUT/up-again.log" 2>&1  # as after changing a setting
seconds up-again
alive 2 > "$OUT/nodes-up-again.json"
seconds worker-up-again
ss -ltnH > "$OUT/listeners.txt"

# the tunnel ends at 8266: this machine's own 8265 is the head's (they share the loopback)
setsid ray dashboard --port 8266 "$CONFIG" > "$OUT/dashboard.log" 2>&1 &
tunnel=$!
python -c '
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8266/api/version", timeout=5)
        break
    except OSError:
        time.sleep(0.5)'
mkdir "$OUT/shared" "$OUT/local"
ray job submit --address http://127.0.0.1:8266 --working-dir "$OUT/job" -- flowbench sweep onprem.yaml \\
    --address auto --storage "$OUT/shared" --results '~/results' > "$OUT/job.log" 2>&1
seconds job
ray rsync-down "$CONFIG" '~/results/onprem/' "$OUT/local/onprem" > "$OUT/rsync.log" 2>&1
seconds rsync-down
ray exec "$CONFIG" 'ray status' > "$OUT/status.log" 2>&1
kill -- -$tunnel

ray down -y "$CONFIG" > "$OUT/down.log" 2>&1
seconds down
flowbench report "$OUT/local/onprem" > "$OUT/report.log" 2>&1  # while the worker's Ray ends itself
# the head's Ray stops at once; the worker's once it has lost the head: its raylet within 10 s
# (RAY_gcs_rpc_server_reconnect_timeout_s), its two agents a minute later (each first tries to tell the gone
# head that the raylet died, for a fixed 60 s: ray/_private/utils.py publish_error_to_driver)
for _ in $(seq 150); do
    [ -z "$(ray_processes)" ] && break
    sleep 1
done
seconds no-ray-left
ray_processes > "$OUT/ray-after-down.txt"
"""


@pytest.fixture(scope="module")
def onprem():
    """One on-prem cluster's life, as the README's operator lives it."""
    skip_unless_able(UNAVAILABLE)  # every test here takes this fixture
    # the SSH connections' shared sockets: a fixed folder of Ray's, removed after unless it was there before
    control = Path(
        "/tmp",
        "ray_ssh_" + hashlib.sha256(getuser().encode()).hexdigest()[:10],
        hashlib.sha256(b"flowbench-onprem").hexdigest()[:10],
    )
    had_control = control.exists()
    try:
        with session_folder("fbup-") as out:
            (out / "cluster.yaml").write_text(onprem_config(out / "keys" / "user"))
            (out / "job").mkdir()
            (out / "job" / "onprem.yaml").write_text(SPEC)
            env = {
                "CONFIG": str(out / "cluster.yaml"),
                "SITE_PACKAGES": sysconfig.get_paths()["purelib"],
                "PYTHON_VERSION": sysconfig.get_python_version(),
                "RAY_TMPDIR": str(out / "client"),  # the cluster state `ray up` keeps where it is typed
            }
            run_session(out, MACHINES + SESSION, env, timeout=900)
            yield out
    finally:
        if not had_control:
            shutil.rmtree(control, ignore_errors=True)
            with contextlib.suppress(OSError):
                control.parent.rmdir()  # if empty


def active_nodes(status: str) -> int:
    """How many nodes `ray status` says are active."""
    block = re.search(r"Active:\n((?: \d+ \S+\n)+)", re.sub(r"\x1b\[[0-9;]*m", "", status))
    return sum(int(line.split()[0]) for line in block.group(1).splitlines()) if block else 0


def test_ray_up_starts_the_head_and_the_worker_and_again(onprem):
    first, again = (json.loads((onprem / name).read_text()) for name in ("nodes-up.json", "nodes-up-again.json"))
    for nodes in (first, again):  # each at the address the config lists
        assert sorted(n["ip"] for n in nodes) == ["127.0.0.2", "127.0.0.3"], nodes
    assert not {n["id"] for n in first} & {n["id"] for n in again}  # the second `ray up` restarted Ray on both
    assert active_nodes((onprem / "status.log").read_text()) == 2  # `ray exec CONFIG 'ray status'`
    # the dashboard and the jobs API listen on the head's loopback only
    listeners = {line.split()[3] for line in (onprem / "listeners.txt").read_text().splitlines()}
    assert {a for a in listeners if a.endswith(":8265")} == {"127.0.0.1:8265"}, listeners


def test_a_job_through_the_dashboards_tunnel_trains_on_both_machines(onprem):
    log = (onprem / "job.log").read_text()
    assert "sweep onprem: 4 trials (4 ok)" in log and "succeeded" in log, log[-3000:]
    trials = read_table(onprem / "local" / "onprem" / "trials.parquet", "trials")
    assert len(trials) == 4 and (trials.status == "ok").all()
    assert set(trials.node) == {n["id"] for n in json.loads((onprem / "nodes-up-again.json").read_text())}
    # '~/results' is the head's home: the driver runs there, not where the command was typed
    assert (onprem / "head" / "home" / "results" / "onprem" / "trials.parquet").exists()


def test_rsync_down_brings_back_what_flowbench_report_reads(onprem):
    local = onprem / "local" / "onprem"
    for name in ("trials.parquet", "curves.parquet", "table2.parquet", "report.md", "report.html", "mlflow.db"):
        assert (local / name).stat().st_size > 0, name
    assert "report" in (onprem / "report.log").read_text()  # `flowbench report LOCAL` ran and said where
    trials = read_table(local / "trials.parquet", "trials")
    _, parents, children = child_runs(f"sqlite:///{local / 'mlflow.db'}", "onprem")
    assert len(parents) == 1 and sorted(c.info.run_name for c in children) == sorted(trials.trial_id)


def test_ray_down_leaves_no_ray_process(onprem):
    assert ray_left(onprem / "ray-after-down.txt") == []
    print("seconds from the session's start:", step_seconds(onprem))
