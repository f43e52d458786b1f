"""cluster-slurm.sbatch on a real SLURM: Debian's munged, slurmctld and two slurmd on one machine, each slurmd
its own host (tests/sweep/machines.py: node1 at 127.0.0.2, node2 at 127.0.0.3). The session submits the
README's command twice: stopped with SIGTERM as at a time limit once a trial has checkpointed, then again.
"""

import random
import re
import shutil

import pytest

from flowbench.results.tables import read_table
from tests.sweep.machines import ray_left, run_session, session_folder, skip_unless_able, step_seconds, unavailable
from tests.sweep.test_cluster import attempts
from tests.sweep.test_runner import spec_file

pytestmark = pytest.mark.slow

UNAVAILABLE = unavailable({"munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm"})

# munged with a key of its own; slurmctld on 127.0.0.1; two nodes, each a slurmd that is its own host, so that
# the batch script finds each node's address from its name, as on a real cluster (Debian's build would also run
# them as one host: it is built with multiple-slurmd support)
MACHINES = """\
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
for _ in $(seq 120); do
    [ "$(sinfo -h -o '%T' | sort -u)" = idle ] && [ "$(sinfo -h -o '%D')" = 2 ] && break
    sleep 0.5
done
sinfo > "$OUT/sinfo.txt"
"""

# `scancel --batch --signal=TERM` signals the batch shell only: what `#SBATCH --signal=B:TERM@300` does at the
# time limit (which SLURM checks about once a minute: too slow to wait for here)
SESSION = """\
cd "$OUT"
submit() {  # the README's sbatch line; prints the job's id
    sbatch --parsable --nodes=2 --cpus-per-task=2 "$ROOT/cluster-slurm.sbatch" "$OUT/slurm.yaml" \\
        --storage "$OUT/storage" --results "$OUT/results"
}
finished() {  # wait for job $1 to end (its processes gone); print its exit status
    local state
    until state=$(scontrol show job -o "$1") && ! [[ $state =~ JobState=(PENDING|CONFIGURING|RUNNING|COMPLETING) ]]; do
        sleep 0.5
    done
    [[ $state =~ ExitCode=([0-9]+): ]] && echo "${BASH_REMATCH[1]}"
}

job=$(submit)
for _ in $(seq 900); do
    compgen -G "$OUT/storage/*/*/checkpoint_*" > /dev/null && break
    sleep 0.2
done
if ! compgen -G "$OUT/storage/*/*/checkpoint_*" > /dev/null; then
    echo "no trial checkpointed within 180 s of the first job's submission" >&2
    exit 1
fi
seconds checkpointed
scancel --batch --signal=TERM "$job"
finished "$job" > "$OUT/status-1.txt"
date +%s.%N > "$OUT/stopped-at.txt"
# what the first job left in storage: each trial's checkpoints (Tune's, not a trial's working folders), their records
(cd "$OUT/storage" && find . -path '*/checkpoint_*/*' \\( -name attempts.jsonl -o -name record.json \\)) \\
    > "$OUT/storage-1.txt"
seconds stopped
ray_processes > "$OUT/ray-after-1.txt"
cp "flowbench-$job.out" "$OUT/job-1.log"

job=$(submit)
finished "$job" > "$OUT/status-2.txt"
seconds resumed
ray_processes > "$OUT/ray-after-2.txt"
cp "flowbench-$job.out" "$OUT/job-2.log"
"""


@pytest.fixture(scope="module")
def slurm():
    skip_unless_able(UNAVAILABLE)  # every test here takes this fixture
    # this run's job ids: the batch script keeps each node's Ray files in /tmp/ray-JOBID, removed after
    first_job = random.randrange(10**6, 10**7)
    try:
        with session_folder("fbslurm-") as out:
            spec_file(out, "slurm", seeds=(0, 1), steps=30)
            env = {"SLURM_CONF": str(out / "slurm.conf"), "FIRST_JOB": str(first_job)}
            run_session(out, MACHINES + SESSION, env, timeout=900)
            yield out
    finally:
        for job in (first_job, first_job + 1):
            shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)


def test_sbatch_passes_sigterm_on_to_the_sweep_and_exits_with_its_status(slurm):
    sinfo = (slurm / "sinfo.txt").read_text()
    assert "node[1-2]" in sinfo and "idle" in sinfo, sinfo
    log = (slurm / "job-1.log").read_text()
    assert "cluster-slurm.sbatch: SIGTERM passed on to flowbench sweep" in log, log[-3000:]
    # flowbench stopped in order, said so in its one line, and exited with 128 + SIGTERM; so did the job
    said = [line for line in log.splitlines() if line.startswith("flowbench:")]
    again = f"flowbench sweep {slurm}/slurm.yaml --storage {slurm}/storage --results {slurm}/results --address "
    assert len(said) == 1 and "Traceback" not in log, log[-3000:]
    assert re.fullmatch(
        r"flowbench: interrupted by SIGTERM while trials ran: [1-4] of 4 trials unfinished, [0-4] running ones "
        r"checkpointed at the step they had reached; the tables and report hold the finished ones and say the sweep "
        rf"is incomplete; run `{re.escape(again)}127\.0\.0\.2:6379` to resume",
        said[0],
    ), said[0]
    assert "cluster-slurm.sbatch: flowbench sweep exited with status 143" in log, log[-3000:]
    assert (slurm / "status-1.txt").read_text() == "143\n"  # the job's exit status is the stopped sweep's
    assert ray_left(slurm / "ray-after-1.txt") == []  # no raylet outlives the job


def test_sbatch_again_resumes_and_finishes_every_trial(slurm):
    log = (slurm / "job-2.log").read_text()
    assert "flowbench sweep exited with status 0" in log and (slurm / "status-2.txt").read_text() == "0\n", log[-3000:]
    results = slurm / "results" / "slurm"
    trials = read_table(results / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == sorted(f"{m}-digits-seed{s}" for m in ("glow", "nxn_shift") for s in (0, 1))
    assert (trials.status == "ok").all() and (trials.steps == 30).all()
    # a Ray node on each SLURM node, each at the address its name resolves to
    node_ips = re.findall(r"Local node IP\S*: \S*?(127\.0\.0\.\d)", log)
    assert sorted(node_ips) == ["127.0.0.2", "127.0.0.3"], node_ips
    for name in ("curves.parquet", "table2.parquet", "report.md"):
        assert (results / name).stat().st_size > 0, name
    # every trial the first job left checkpointed and unfinished went on from that checkpoint: its last
    # checkpoint carries the first job's attempt, then the second's (a retrained trial's would carry one);
    # each evaluation once
    left = [path.split("/") for path in (slurm / "storage-1.txt").read_text().split()]
    checkpointed = {p[2] for p in left if p[-1] == "attempts.jsonl"} - {p[2] for p in left if p[-1] == "record.json"}
    assert checkpointed, "the first job was stopped before any trial had checkpointed"
    stopped_at = float((slurm / "stopped-at.txt").read_text())
    for trial in checkpointed:
        tried = attempts(slurm / "storage", trial)
        assert [a["how"] for a in tried] == ["fresh", "resumed"], (trial, tried)
        assert tried[0]["at"] < stopped_at < tried[1]["at"], (trial, tried, stopped_at)
    curves = read_table(results / "curves.parquet", "curves")
    for trial, steps in curves.groupby("trial_id").step:
        assert sorted(steps) == [10, 20, 30], trial
    assert ray_left(slurm / "ray-after-2.txt") == []
    print("seconds from the session's start:", step_seconds(slurm))
