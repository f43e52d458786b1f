"""Machines for the launcher tests (test_ray_up.py, test_slurm.py), on one machine.

A session is one bash script run as PID 1 of private network, PID, mount and UTS namespaces (``unshare``, as
root: CI is): nothing listens outside it, and every process it starts ends with it. Its machines are servers
(sshd, slurmd) in namespaces of their own inside it: each has its own process table (`ray stop` on one machine
sees only its own Ray), its own host name resolving to its own loopback address, its own home folder and its own
/tmp/ray (Ray's temp folder, whose path a worker takes from its head); they share the rest of the file system
(as an NFS mount would) and the loopback network. Ray takes a head address of
127.0.0.1 to mean "this machine", so the machines are 127.0.0.2 (the head) and 127.0.0.3. A session types the
README's commands; what it saw lands in files that the tests read.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY_PROCESS = r"raylet|gcs_server|ray/_private|ray/dashboard|ray/autoscaler|ray::|bin/ray "
BASE_TOOLS = {"unshare": "util-linux", "ip": "iproute2", "ss": "iproute2"}


def unavailable(tools: dict[str, str]) -> str | None:
    """Why sessions with these tools (name: Debian package) cannot run here, in one line; None if they can."""
    if sys.platform != "linux":
        return "private namespaces (unshare) are Linux-only"
    for tool, package in (BASE_TOOLS | tools).items():
        if shutil.which(tool, path=f"{os.environ['PATH']}:/usr/sbin:/sbin") is None:
            return f"`{tool}` is not installed: apt-get install {package} (.ci/run does, as root)"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--uts", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"unshare of network, PID and UTS namespaces is not permitted here (needs root): {probe.stderr.strip()}"
    return None


def skip_unless_able(why: str | None) -> None:
    """Skip a test that cannot run here, saying why (``unavailable``'s line). Under CI (``CI=true``) that
    is a failure with the same line: CI runs these tests as root with their packages installed (.ci/run),
    and a skip there would pass quietly without them."""
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


# `machine NAME IP COMMAND...`: COMMAND in PID, mount and UTS namespaces of its own, the child of a bash that
# stays PID 1 and reaps orphans (as an init does), with host name NAME resolving to IP, root's home $OUT/NAME/home
# and /tmp/ray in $OUT/NAME/ray
PREAMBLE = f"""\
set -euo pipefail
ip link set lo up
mkdir -p /tmp/ray  # where each machine mounts its own
machine() {{
    local name=$1 ip=$2 dir=$OUT/$1
    shift 2
    mkdir -p "$dir/home" "$dir/ray"
    {{ echo "$ip $name"; cat /etc/hosts; }} > "$dir/hosts"
    awk -F: -v OFS=: -v home="$dir/home" '$1 == "root" {{$6 = home}} 1' /etc/passwd > "$dir/passwd"
    unshare --pid --fork --mount-proc --uts bash -c 'hostname "$1" && mount --bind "$2/hosts" /etc/hosts &&
        mount --bind "$2/passwd" /etc/passwd && mount --bind "$2/ray" /tmp/ray && shift 2 && "$@"; true' \\
        machine "$name" "$dir" "$@" > "$dir/machine.log" 2>&1 &
}}
seconds() {{ echo "$1 $SECONDS" >> "$OUT/seconds.txt"; }}  # when each step ended
ray_processes() {{ ps -eo pid,stat,args | grep -E '{RAY_PROCESS}' | grep -v grep || true; }}
"""


@contextlib.contextmanager
def session_folder(prefix: str) -> Iterator[Path]:
    # short, in /tmp: Ray's socket paths under the machines' temp folders must fit in 107 bytes
    out = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_session(out: Path, script: str, env: dict[str, str], timeout: float) -> None:
    """Run PREAMBLE + script in fresh namespaces, from the checkout, with this environment's `ray`, `flowbench`
    and `python` first on PATH (--kill-child: a test that times out ends it all)."""
    (out / "session.sh").write_text(PREAMBLE + textwrap.dedent(script))
    (out / "tmp").mkdir()
    env = (
        os.environ
        | {
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}:/usr/sbin:/sbin",
            "OUT": str(out),
            "ROOT": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TMPDIR": str(out / "tmp"),  # what Ray's CLI leaves in the temp folder stays in the session's
        }
        | env
    )
    command = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child", "bash"]
    done = subprocess.run(
        [*command, str(out / "session.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    logs = [*out.glob("*.log"), *out.glob("*/machine.log"), *out.rglob("monitor.out"), *out.rglob("monitor.err")]
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{tails}"


def ray_left(listing: Path) -> list[str]:
    """The Ray processes in a session's `ray_processes` listing."""
    return [line for line in listing.read_text().splitlines() if re.search(RAY_PROCESS, line)]


def step_seconds(out: Path) -> dict[str, int]:
    """When each step of the session ended, in seconds from its start."""
    return {name: int(at) for name, at in (line.split() for line in (out / "seconds.txt").read_text().splitlines())}
