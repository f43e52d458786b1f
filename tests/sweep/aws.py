"""Amazon's side of tests/sweep/test_ray_aws.py, on one machine: moto's server is EC2, IAM and S3, and cloud-init
and the VPC's network are played here. Run inside the session's private namespaces (tests/sweep/machines.py) as
``python -m tests.sweep.aws COMMAND``:

- ``prepare CONFIG``: wait for moto, then what the operator does once before `ray up`, as cluster.yaml's comments
  say: the security group that lets SSH in from the operator's network only (its id goes into CONFIG's EDIT line)
  and the bucket for `--storage`.
- ``cloud-init``: the VPC, a bridge in the session's network namespace at 172.31.0.1 (the default VPC's range, where
  moto's subnets are). For each instance moto reports running, what EC2 and the image do: a machine (machines.py)
  with EC2's host name, in a network namespace of its own whose eth0, on the bridge, holds its private address
  (its route out via the VPC's router) and its public one (routed to it from the session: the operator's side); the
  image's Python; user `ubuntu`, whose authorized key is the launch's key pair; an OpenSSH server. For each instance
  moto reports terminated, its machine ends, every process of it, and its network with it. Runs until killed.
- ``snapshot``: what moto holds (instances, security groups, instance profiles, the bucket's keys), as JSON.

Nothing leaves the session's network namespace: it has no route out.
"""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import boto3
import botocore.exceptions

from tests.sweep.machines import PREAMBLE

REGION = "us-west-2"  # cluster.yaml's
MOTO_PORT = 5000
ROUTER = "172.31.0.1"  # the VPC's router: the session's end of the bridge, where moto also answers the instances
OPERATOR_NETWORK = "203.0.113.0/24"  # the operator's network: a range kept for documentation (RFC 5737)
BUCKET = "flowbench"
# the AMI's user (cluster.yaml's ssh_user) is root here, not Ubuntu's uid 1000 with sudo: this machine's Python
# lives under /root (mode 700), where no other user reaches it
UBUNTU = 0
# the instances' view of AWS: on EC2 the instance profile's credentials come from the metadata service; here moto
# takes any. PIP_NO_INDEX: the image is offline (no package index reachable from these namespaces), and
# PIP_NO_BUILD_ISOLATION=0 (which means no isolation) builds the checkout with the image's setuptools
INSTANCE_ENV = {
    "AWS_ENDPOINT_URL": f"http://{ROUTER}:{MOTO_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "PIP_NO_INDEX": "1",
    "PIP_NO_BUILD_ISOLATION": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
OUT = Path(os.environ.get("OUT", "."))


def client(service: str):
    # no endpoint here: botocore takes AWS_ENDPOINT_URL from the environment, as Ray's own clients do
    return boto3.client(service, region_name=REGION)


def run(*command: str) -> None:
    subprocess.run(command, check=True)


def prepare(config: Path) -> None:
    ec2 = client("ec2")
    for _ in range(240):
        try:
            ec2.describe_regions()
            break
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
            time.sleep(0.25)
    else:
        raise SystemExit("moto_server did not answer within 60 s")
    # cluster.yaml's `aws ec2 create-security-group` and two `authorize-security-group-ingress`
    group = ec2.create_security_group(GroupName="flowbench", Description="flowbench Ray cluster")["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group, IpProtocol="tcp", FromPort=22, ToPort=22, CidrIp=OPERATOR_NETWORK
    )
    ec2.authorize_security_group_ingress(
        GroupId=group, IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}]
    )
    client("s3").create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    config.write_text(config.read_text().replace("OPERATOR_GROUP", group))


class CloudInit:
    """Machines for moto's instances: started when moto says running, ended when it says terminated."""

    def __init__(self):
        self.ec2 = client("ec2")
        self.machines: dict[str, dict] = {}  # instance id -> its machine, while it runs
        run("ip", "link", "add", "vpc", "type", "bridge")
        run("ip", "addr", "add", f"{ROUTER}/16", "dev", "vpc")
        run("ip", "link", "set", "vpc", "up")

    def watch(self) -> None:
        while True:
            try:
                reservations = self.ec2.describe_instances()["Reservations"]
            except botocore.exceptions.BotoCoreError:  # moto busy: ask again
                reservations = []
            for instance in (i for r in reservations for i in r["Instances"]):
                state, instance_id = instance["State"]["Name"], instance["InstanceId"]
                if state == "running" and instance_id not in self.machines:
                    self.boot(instance)
                elif state != "running" and instance_id in self.machines:
                    self.end(instance_id)
            time.sleep(2)

    def boot(self, instance: dict) -> None:
        name = instance["PrivateDnsName"].split(".")[0]  # ip-172-31-…: the host name EC2 gives it
        private, public = instance["PrivateIpAddress"], instance["PublicIpAddress"]
        folder = OUT / name
        home, image = folder / "home", folder / "image"
        (home / ".ssh").mkdir(parents=True)
        # cloud-init: the launch's key pair authorizes the default user
        (key,) = self.ec2.describe_key_pairs(KeyNames=[instance["KeyName"]], IncludePublicKey=True)["KeyPairs"]
        (home / ".ssh" / "authorized_keys").write_text(key["PublicKey"].strip() + "\n")
        self.make_image(image, home)
        # first: the user of its uid (whose home `~` means to ssh, for the key the head uses for its workers)
        with open("/etc/passwd") as system:
            users = [line for line in system if not line.startswith("ubuntu:")]
        (folder / "passwd-image").write_text(f"ubuntu:x:{UBUNTU}:{UBUNTU}::{home}:/bin/bash\n" + "".join(users))
        (folder / "sshd_config").write_text(
            f"HostKey {OUT}/keys/host\nPidFile {folder}/sshd.pid\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"SetEnv {' '.join(f'{k}={v}' for k, v in INSTANCE_ENV.items())}\n"
        )
        # in the machine: the image's users, a network namespace of its own, and once EC2 has attached its network
        # interface, the OpenSSH server (the machine ends when it does)
        (folder / "instance.sh").write_text(
            "until ip link show eth0 > /dev/null 2>&1; do sleep 0.1; done\n"
            f"exec /usr/sbin/sshd -D -f {folder}/sshd_config -E {folder}/sshd.log\n"
        )
        boot = f"mount --bind {folder}/passwd-image /etc/passwd && exec unshare --net bash {folder}/instance.sh"
        run("bash", "-c", PREAMBLE + 'machine "$@"\n', "boot", name, private, "bash", "-c", boot)
        pid = self.network_holder(folder)
        # EC2's network interface: on the VPC's bridge, both addresses, the router as the way out
        veth = "v" + instance["InstanceId"][-12:]
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
        run("ip", "link", "set", veth, "master", "vpc", "up")
        inside = ("nsenter", f"--net=/proc/{pid}/ns/net", "ip")
        run(*inside, "link", "set", "lo", "up")
        run(*inside, "addr", "add", f"{private}/16", "dev", "eth0")
        run(*inside, "addr", "add", f"{public}/32", "dev", "eth0")
        run(*inside, "link", "set", "eth0", "up")
        run(*inside, "route", "add", "default", "via", ROUTER)
        run("ip", "route", "add", f"{public}/32", "dev", "vpc")  # the operator reaches it at its public address
        (folder / "net-pid").write_text(f"{pid}\n")
        self.machines[instance["InstanceId"]] = {"folder": folder, "public": public}
        print(f"{time.time():.1f} boot {instance['InstanceId']} {name} {private} {public}", flush=True)

    @staticmethod
    def network_holder(folder: Path) -> int:
        """The machine's process in its own network namespace (as this namespace numbers it)."""
        ours = os.readlink("/proc/self/ns/net")
        for _ in range(600):
            for entry in Path("/proc").iterdir():
                try:
                    if str(folder / "instance.sh").encode() in (entry / "cmdline").read_bytes() and (
                        os.readlink(entry / "ns" / "net") != ours
                    ):
                        return int(entry.name)
                except (OSError, ValueError):  # not a process, or gone
                    continue
            time.sleep(0.1)
        raise SystemExit(f"{folder.name}: no process in a network namespace of its own within 60 s")

    @staticmethod
    def make_image(image: Path, home: Path) -> None:
        """The image's Python: a venv with this environment's packages (Ray, torch, pip; flowbench the setup
        commands install), its `ray` and `pip` commands on the login's PATH, as the AMI's are."""
        run(sys.executable, "-m", "venv", "--without-pip", str(image))
        site = image / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
        (site / "reuse.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        for command, main in (("ray", "ray.scripts.scripts"), ("pip", "pip._internal.cli.main")):
            path = image / "bin" / command
            path.write_text(f"#!{image}/bin/python\nimport sys\nfrom {main} import main\nsys.exit(main())\n")
            path.chmod(0o755)
        (home / ".bashrc").write_text(f"export PATH={image}/bin:$PATH\n")

    def end(self, instance_id: str) -> None:
        """The instance is gone: its OpenSSH server ends, and with it its machine's PID namespace (every process
        inside) and network namespace (its interface)."""
        machine = self.machines.pop(instance_id)
        config = f"-f {machine['folder']}/sshd_config".encode()
        for entry in Path("/proc").iterdir():
            try:
                if config in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                    os.kill(int(entry.name), signal.SIGTERM)
            except (OSError, ValueError):  # not a process, or gone
                continue
        run("ip", "route", "del", f"{machine['public']}/32", "dev", "vpc")
        print(f"{time.time():.1f} end {instance_id} {machine['folder'].name}", flush=True)


def snapshot() -> dict:
    """What moto holds, for the tests to read."""
    ec2, iam = client("ec2"), client("iam")
    instances = [
        {
            "id": i["InstanceId"],
            "type": i["InstanceType"],
            "state": i["State"]["Name"],
            "private_ip": i.get("PrivateIpAddress"),
            "public_ip": i.get("PublicIpAddress"),
            "image": i["ImageId"],
            "key": i.get("KeyName"),
            "profile": i.get("IamInstanceProfile", {}).get("Arn"),
            "groups": sorted(g["GroupId"] for g in i.get("SecurityGroups", [])),
            "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])},
        }
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    ]
    groups = [
        {"id": g["GroupId"], "name": g["GroupName"], "ingress": g["IpPermissions"]}
        for g in ec2.describe_security_groups()["SecurityGroups"]
    ]
    profiles = {
        p["InstanceProfileName"]: {
            "arn": p["Arn"],
            "roles": {
                r["RoleName"]: sorted(
                    a["PolicyArn"] for a in iam.list_attached_role_policies(RoleName=r["RoleName"])["AttachedPolicies"]
                )
                for r in p["Roles"]
            },
        }
        for p in iam.list_instance_profiles()["InstanceProfiles"]
    }
    pages = client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {"instances": instances, "groups": groups, "profiles": profiles, "keys": keys}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "prepare":
        prepare(Path(sys.argv[2]))
    elif command == "cloud-init":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        CloudInit().watch()
    elif command == "snapshot":
        print(json.dumps(snapshot(), default=str))
    else:
        raise SystemExit(f"unknown command {command}")
