"""The operator's launchers, run for real on one machine: Ray's cluster launcher with the on-prem config
(`ray up` over real OpenSSH servers) and SLURM with the shipped batch script (real munged, slurmctld, slurmd).

Each test is one session in private network, PID, mount and UTS namespaces (``unshare``, as root: CI is):
nothing listens outside it, and every process it starts ends with it. Its machines are servers (sshd,
slurmd) in namespaces of their own inside it: each has its own process table (`ray stop` on one machine sees
only its own Ray), its own host name resolving to its own loopback address, and, for SSH, its own home folder;
they share the file system (as an NFS mount would) and the loopback network. Ray takes a head address of
127.0.0.1 to mean "this machine", so the machines are 127.0.0.2 (head) and 127.0.0.3 (worker). The sessions
type the README's commands; what they saw lands in files that the tests below read.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from getpass import getuser
from pathlib import Path

import pytest

from flowbench.results.tables import read_table
from tests.sweep.test_runner import child_runs, spec_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # ray, flowbench, python of the environment under test
RAY_PROCESS = re.compile(r"raylet|gcs_server|ray/_private|ray/dashboard|ray/autoscaler|ray::|bin/ray ")
APT = "apt-get install openssh-server rsync slurm-wlm munge (.ci/run does, as root)"


def _unavailable(tools: dict[str, str]) -> str | None:
    if sys.platform != "linux":
        return "private namespaces (unshare) are Linux-only"
    for tool, package in tools.items():
        if shutil.which(tool, path=f"{os.environ['PATH']}:/usr/sbin:/sbin") is None:
            return f"`{tool}` is not installed ({package}): {APT}"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--uts", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"unshare of network, PID and UTS namespaces is not permitted here (needs root): {probe.stderr.strip()}"
    return None


BASE_TOOLS = {"unshare": "util-linux", "ip": "iproute2", "ss": "iproute2"}
NO_SSH = _unavailable(BASE_TOOLS | {"sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync"})
NO_SLURM = _unavailable(BASE_TOOLS | {"munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm"})

# A machine: COMMAND in PID, mount and UTS namespaces of its own, as the child of a bash that stays PID 1 and
# reaps orphans (as an init does), with host name NAME resolving to IP and root's home in $OUT/NAME/home.
MACHINE = (
    """\
machine() {  # NAME IP COMMAND...
    local name=$1 ip=$2 dir=$OUT/$1
    shift 2
    mkdir -p "$dir/home"
    { echo "$ip $name"; cat /etc/hosts; } > "$dir/hosts"
    awk -F: -v OFS=: -v home="$dir/home" '$1 == "root" {$6 = home} 1' /etc/passwd > "$dir/passwd"
    unshare --pid --fork --mount-proc --uts bash -c 'hostname "$1" && mount --bind "$2/hosts" /etc/hosts &&
        mount --bind "$2/passwd" /etc/passwd && shift 2 && "$@"; true' machine "$name" "$dir" "$@" \\
        > "$dir/machine.log" 2>&1 &
}
seconds() { echo "$1 $SECONDS" >> "$OUT/seconds.txt"; }  # when each step ended, for the report
ray_processes() { ps -eo pid,stat,args | grep -E '"""
    + RAY_PROCESS.pattern
    + """' | grep -v grep || true; }
"""
)


def run_session(out: Path, script: str, env: dict, timeout: float) -> None:
    """Run the session's bash script as PID 1 of fresh namespaces (--kill-child: a timed-out test ends it all)."""
    (out / "session.sh").write_text("set -euo pipefail\nip link set lo up\n" + MACHINE + textwrap.dedent(script))
    env = (
        os.environ
        | {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}:/usr/sbin:/sbin",
            "OUT": str(out),
            "ROOT": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TMPDIR": str(out / "tmp"),  # what Ray's CLI writes to the temp folder stays in the session's
        }
        | env
    )
    (out / "tmp").mkdir()
    done = subprocess.run(
        [
            "unshare",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--uts",
            "--kill-child",
            "bash",
            str(out / "session.sh"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(out.rglob("*.log")))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{logs[-20000:]}"


def short_tempdir(prefix: str) -> Path:
    # short: Ray's socket paths under each machine's temp folder must fit in 107 bytes
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def step_seconds(out: Path) -> dict[str, int]:
    return {name: int(s) for name, s in (line.split() for line in (out / "seconds.txt").read_text().splitlines())}


# --------------------------------------------------------------------------- ray up over SSH
# The config's lines marked EDIT, as a user edits them for these two machines.
def onprem_config(keys: Path) -> str:
    edits = {
        "head_ip": "127.0.0.2",
        "worker_ips": "[127.0.0.3]",
        "ssh_user": "root",
        "ssh_private_key": str(keys / "user"),
    }
    lines = (ROOT / "cluster-onprem.yaml").read_text().splitlines()
    edited = []
    for line in lines:
        if "# EDIT" in line:
            key = line.split(":")[0].strip()
            line = f"{line.split(':')[0]}: {edits.pop(key)}"
        edited.append(line)
    assert not edits, f"no line marked EDIT for {edits}"
    return "\n".join(edited) + "\n"


# The machines' environment: the one their `ray start` and `flowbench` find after the config's setup commands.
# ~/flowbench-env already exists, as after a first `ray up`: a venv that reuses this environment's packages (a
# .pth line, as tests/test_wheel.py does: offline and fast) with Ray's command; the setup's pip installs the
# synced checkout into it, offline (PIP_NO_INDEX, and setuptools from those packages: PIP_NO_BUILD_ISOLATION=0
# means no isolation). RAY_gcs_rpc_server_reconnect_timeout_s: a worker whose head is gone ends its Ray after
# 15 s instead of Ray's 60, so that the test does not wait a minute after `ray down`.
SSH_MACHINES = """\
mkdir -p /run/sshd "$OUT/keys"  # sshd's privilege separation folder, as its Debian service makes it
ssh-keygen -q -t ed25519 -N '' -f "$OUT/keys/host"
ssh-keygen -q -t ed25519 -N '' -f "$OUT/keys/user"
cp "$OUT/keys/user.pub" "$OUT/keys/authorized_keys"
MACHINE_ENV="PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 RAY_USAGE_STATS_ENABLED=0"
MACHINE_ENV+=" RAY_gcs_rpc_server_reconnect_timeout_s=15"
for node in head:127.0.0.2 worker:127.0.0.3; do
    name=${node%%:*} ip=${node#*:}
    env=$OUT/$name/home/flowbench-env
    mkdir -p "$OUT/$name/home" "$OUT/$name/tmp"
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
SetEnv RAY_TMPDIR=$OUT/$name/tmp $MACHINE_ENV
EOF
    machine "$name" "$ip" /usr/sbin/sshd -D -f "$OUT/$name/sshd_config" -E "$OUT/$name/sshd.log"
done
"""

# the alive nodes, asked of the head's dashboard (Ray's state API) until there are $1; to stdout as JSON
ALIVE = """\
alive() {
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

# the README's operator path, line by line
RAY_UP_SESSION = """\
ray up -y "$CONFIG" > "$OUT/up.log" 2>&1
seconds up
alive 2 > "$OUT/nodes-up.json"
seconds both-nodes
ray up -y "$CONFIG" > "$OUT/up-again.log" 2>&1  # an operator changing a setting
seconds up-again
alive 2 > "$OUT/nodes-up-again.json"
seconds both-nodes-again
ss -ltnH > "$OUT/listeners.txt"

# 8265 is the head's own on this shared loopback: the tunnel ends at 8266 here
setsid ray dashboard --port 8266 "$CONFIG" > "$OUT/dashboard.log" 2>&1 &
tunnel=$!
python -c '
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:8266/api/version", timeout=5)
        break
    except OSError:
        time.sleep(0.5)'
mkdir "$OUT/shared"
ray job submit --address http://127.0.0.1:8266 -- flowbench sweep smoke --address auto \\
    --storage "$OUT/shared" --results '~/results' > "$OUT/job.log" 2>&1
seconds job
mkdir "$OUT/local"
ray rsync-down "$CONFIG" '~/results/smoke/' "$OUT/local/smoke" > "$OUT/rsync.log" 2>&1
flowbench report "$OUT/local/smoke" > "$OUT/report.log" 2>&1
seconds rsync-down-and-report
ray exec "$CONFIG" 'ray status' > "$OUT/status.log" 2>&1
kill -- -$tunnel

ray down -y "$CONFIG" > "$OUT/down.log" 2>&1
seconds down
for _ in $(seq 90); do
    [ -z "$(ray_processes)" ] && break
    sleep 1
done
seconds no-ray-left
ray_processes > "$OUT/ray-after-down.txt"
"""


@pytest.fixture(scope="module")
def onprem():
    """One on-prem cluster's life, as the README's operator lives it: up, up again, a job through the
    forwarded dashboard, results brought back and reported, status, down."""
    if NO_SSH:
        pytest.skip(NO_SSH)
    out = short_tempdir("fbup-")
    # the SSH connections' shared sockets: Ray's fixed folder, removed after unless it was there before
    control = Path(
        "/tmp",
        "ray_ssh_" + hashlib.sha256(getuser().encode()).hexdigest()[:10],
        hashlib.sha256(b"flowbench-onprem").hexdigest()[:10],
    )
    had_control = control.exists()
    try:
        (out / "cluster.yaml").write_text(onprem_config(out / "keys"))
        site = sysconfig.get_paths()["purelib"]
        run_session(
            out,
            ALIVE + SSH_MACHINES + RAY_UP_SESSION,
            env={
                "CONFIG": str(out / "cluster.yaml"),
                "SITE_PACKAGES": site,
                "PYTHON_VERSION": sysconfig.get_python_version(),
                "RAY_TMPDIR": str(out / "client"),
            },
            timeout=900,
        )
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not had_control:
            shutil.rmtree(control, ignore_errors=True)
            with contextlib.suppress(OSError):
                control.parent.rmdir()  # only if empty


def active_nodes(status: str) -> int:
    """The number of active nodes in `ray status`'s output."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", status)
    block = re.search(r"Active:\n((?: \d+ \S+\n)+)", text)
    return sum(int(line.split()[0]) for line in block.group(1).splitlines()) if block else 0


@pytest.mark.skipif(NO_SSH is not None, reason=str(NO_SSH))
def test_ray_up_brings_up_the_head_and_the_worker_and_again(onprem):
    for name in ("nodes-up.json", "nodes-up-again.json"):
        nodes = json.loads((onprem / name).read_text())
        assert sorted(n["ip"] for n in nodes) == ["127.0.0.2", "127.0.0.3"], (name, nodes)  # the listed addresses
    first, again = (json.loads((onprem / n).read_text()) for n in ("nodes-up.json", "nodes-up-again.json"))
    assert not {n["id"] for n in first} & {n["id"] for n in again}  # the second `ray up` restarted Ray on both
    assert active_nodes((onprem / "status.log").read_text()) == 2  # `ray exec CONFIG 'ray status'`
    # the dashboard and jobs API listen on the head's loopback only
    listeners = {line.split()[3] for line in (onprem / "listeners.txt").read_text().splitlines()}
    assert {a for a in listeners if a.endswith(":8265")} == {"127.0.0.1:8265"}, listeners


@pytest.mark.skipif(NO_SSH is not None, reason=str(NO_SSH))
def test_a_job_through_the_forwarded_dashboard_trains_on_both_machines(onprem):
    log = (onprem / "job.log").read_text()
    assert "succeeded" in log and "sweep smoke: 4 trials (4 ok)" in log, log[-3000:]
    trials = read_table(onprem / "local" / "smoke" / "trials.parquet", "trials")
    assert len(trials) == 4 and (trials.status == "ok").all()
    nodes = {n["id"] for n in json.loads((onprem / "nodes-up-again.json").read_text())}
    assert set(trials.node) == nodes  # both machines trained
    # the results went to the head's ~/results (the driver runs there), not to the machine that typed the command
    assert (onprem / "head" / "home" / "results" / "smoke" / "trials.parquet").exists()


@pytest.mark.skipif(NO_SSH is not None, reason=str(NO_SSH))
def test_rsync_down_brings_back_what_flowbench_report_reads(onprem):
    local = onprem / "local" / "smoke"
    for name in ("trials.parquet", "curves.parquet", "table2.parquet", "report.md", "report.html", "mlflow.db"):
        assert (local / name).stat().st_size > 0, name
    assert "report" in (onprem / "report.log").read_text()
    _, parents, children = child_runs(f"sqlite:///{local / 'mlflow.db'}", "smoke")
    assert len(parents) == 1 and sorted(c.info.run_name for c in children) == sorted(
        read_table(local / "trials.parquet", "trials").trial_id
    )


@pytest.mark.skipif(NO_SSH is not None, reason=str(NO_SSH))
def test_ray_down_leaves_no_ray_process(onprem):
    assert (onprem / "ray-after-down.txt").read_text().strip() == ""
    print(step_seconds(onprem))


# --------------------------------------------------------------------------- SLURM with sbatch
# munged with a key of its own; slurmctld on 127.0.0.1; one slurmd per machine, each its own host (UTS) so
# that SLURM and Ray's `hostname --ip-address` find the node's address, as on a real cluster
SLURM_MACHINES = """\
ip addr add 192.0.2.1/32 dev lo  # SLURM resolves with AI_ADDRCONFIG, which wants a non-loopback IPv4 address
hostname controller
mkdir -m 700 "$OUT/munge" "$OUT/state"
head -c 1024 /dev/urandom > "$OUT/munge/munge.key"
chmod 400 "$OUT/munge/munge.key"
munged --force --origin=127.0.0.1 --socket="$OUT/munge/socket" --key-file="$OUT/munge/munge.key" \\
    --pid-file="$OUT/munge/munged.pid" --log-file="$OUT/munge/munged.log" --seed-file="$OUT/munge/seed"
cat > "$SLURM_CONF" <<EOF
ClusterName=flowbench
FirstJobId=$FIRST_JOB
SlurmctldHost=controller(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$OUT/munge/socket
CredType=cred/munge
StateSaveLocation=$OUT/state
SlurmdSpoolDir=$OUT/%n/spool
SlurmctldPidFile=$OUT/slurmctld.pid
SlurmdPidFile=$OUT/%n/slurmd.pid
SlurmctldLogFile=$OUT/slurmctld.log
SlurmdLogFile=$OUT/%n/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
ReturnToService=2
KillWait=5
NodeName=node1 NodeAddr=127.0.0.2 Port=6818 CPUs=2 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.3 Port=6819 CPUs=2 State=UNKNOWN
PartitionName=main Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -i > "$OUT/slurmctld.out.log" 2>&1 &
machine node1 127.0.0.2 slurmd -D
machine node2 127.0.0.3 slurmd -D
for _ in $(seq 60); do
    [ "$(sinfo -h -o '%T' | sort -u)" = idle ] && [ "$(sinfo -h -o '%D')" = 2 ] && break
    sleep 0.5
done
sinfo > "$OUT/sinfo.txt"
"""

# the README's SLURM command twice: stopped by SIGTERM (what --signal=B:TERM@… sends at the time limit: to the
# batch shell only) once a trial has checkpointed, then again, to resume and finish
SLURM_SESSION = """\
cd "$OUT"
submit=(sbatch --wait --nodes=2 --cpus-per-task=2 "$ROOT/cluster-slurm.sbatch" "$OUT/slurm.yaml"
        --storage "$OUT/storage" --results "$OUT/results")
"${submit[@]}" > "$OUT/submit-1.txt" &
sbatch_pid=$!
until job=$(grep -o '[0-9]\\+' "$OUT/submit-1.txt"); do sleep 0.2; done
for _ in $(seq 600); do
    compgen -G "$OUT/storage/*/*/checkpoint_*" > /dev/null && break
    sleep 0.2
done
seconds checkpointed
scancel --batch --signal=TERM "$job"
status=0
wait $sbatch_pid || status=$?
echo "$status" > "$OUT/status-1.txt"
seconds stopped
ray_processes > "$OUT/ray-after-1.txt"
cp "flowbench-$job.out" "$OUT/job-1.log"

"${submit[@]}" > "$OUT/submit-2.txt"
seconds resumed
job=$(grep -o '[0-9]\\+' "$OUT/submit-2.txt")
ray_processes > "$OUT/ray-after-2.txt"
cp "flowbench-$job.out" "$OUT/job-2.log"
"""


@pytest.fixture(scope="module")
def slurm():
    if NO_SLURM:
        pytest.skip(NO_SLURM)
    out = short_tempdir("fbslurm-")
    # job ids of this run only: the batch script keeps each node's Ray files in /tmp/ray-JOBID, removed after
    first_job = random.randrange(10**6, 10**7)
    try:
        spec_file(out, "slurm", seeds=(0, 1), steps=100)
        env = {"SLURM_CONF": str(out / "slurm.conf"), "FIRST_JOB": str(first_job)}
        run_session(out, SLURM_MACHINES + SLURM_SESSION, env=env, timeout=900)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
        for job in (first_job, first_job + 1):
            shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)


@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_sbatch_passes_sigterm_to_the_sweep_and_exits_with_its_status(slurm):
    assert "idle" in (slurm / "sinfo.txt").read_text() and "node[1-2]" in (slurm / "sinfo.txt").read_text()
    log = (slurm / "job-1.log").read_text()
    assert "cluster-slurm.sbatch: SIGTERM passed on to flowbench sweep" in log, log[-3000:]
    (driver,) = re.findall(r"flowbench sweep exited with status (\d+)", log)
    status = int((slurm / "status-1.txt").read_text())
    assert status == int(driver) != 0  # the job's status is the stopped driver's
    assert (slurm / "ray-after-1.txt").read_text().strip() == ""  # no raylet outlives the job


@pytest.mark.skipif(NO_SLURM is not None, reason=str(NO_SLURM))
def test_sbatch_again_resumes_and_finishes_every_trial_on_both_nodes(slurm):
    log = (slurm / "job-2.log").read_text()
    assert "flowbench sweep exited with status 0" in log, log[-3000:]
    trials = read_table(slurm / "results" / "slurm" / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == sorted(f"{m}-digits-seed{s}" for m in ("glow", "nxn_shift") for s in (0, 1))
    assert (trials.status == "ok").all() and (trials.steps == 100).all()
    assert trials.node.nunique() == 2  # Ray ran on both SLURM nodes
    for name in ("curves.parquet", "table2.parquet", "report.md"):
        assert (slurm / "results" / "slurm" / name).stat().st_size > 0
    assert (slurm / "ray-after-2.txt").read_text().strip() == ""
    print(step_seconds(slurm))
