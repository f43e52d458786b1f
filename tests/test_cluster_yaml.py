"""The cluster configs as `ray up` reads them (Ray's defaults filled in, then Ray's own autoscaler schema), the
SLURM batch script's directives, and docs/cluster.md. tests/sweep/test_ray_up.py and
tests/sweep/test_slurm.py run the on-prem config and the batch script for real."""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def prepared(name: str) -> dict:
    """What `ray up NAME` works from: the file merged with the provider's defaults.yaml, setup commands
    merged, per-node-type worker bounds filled (Ray's prepare_config)."""
    return prepare_config(yaml.safe_load((ROOT / name).read_text()))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return prepared("cluster.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_configs_pass_rays_autoscaler_schema(name):
    cluster = prepared(name)
    validate_config(cluster)  # ray/autoscaler/ray-schema.json, as `ray up` checks it
    broken = copy.deepcopy(cluster)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def _ray_start_options(command: str) -> dict[str, str]:
    words = shlex.split(command.split(";")[-1])
    return dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--") and "=" in w)


@pytest.mark.parametrize("name", CONFIGS)
def test_dashboard_and_jobs_api_stay_on_the_heads_loopback(name):
    cluster = prepared(name)
    (start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert _ray_start_options(start)["dashboard-host"] == "127.0.0.1"
    # Ray's own default head command binds 0.0.0.0: nothing of it may survive the merge
    assert "0.0.0.0" not in yaml.safe_dump(cluster)


def test_no_ami_id_that_cannot_be_checked(cluster):
    for name, node_type in cluster["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        # resolved by EC2 at launch from a parameter AWS publishes (the file says how to look it up)
        assert image.startswith("resolve:ssm:/aws/service/"), (name, image)
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"ami-[0-9a-f]{8,}", text)
    assert "aws ssm get-parameter" in text and image.removeprefix("resolve:ssm:") in text


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_installs_the_checkout_with_the_readmes_torch_pin(name):
    cluster = prepared(name)
    readme_pins = set(re.findall(r"torch==[\w.]+", (ROOT / "README.md").read_text()))
    assert len(readme_pins) == 1, readme_pins
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        (install,) = [c for c in commands if "install" in c and mount in shlex.split(c)]
        words = shlex.split(install)
        assert words[words.index("install") - 1] == "pip" and readme_pins <= set(words)
        assert "-e" not in words  # installed as the wheel is: package data, not the checkout's files


def test_ssh_comes_in_only_through_a_group_the_operator_makes(cluster):
    """Left to itself, Ray makes a security group that lets SSH in from 0.0.0.0/0. Every node type names the
    operator's group instead (tests/sweep/test_ray_aws.py makes it as the file says and reads it back)."""
    groups = {name: t["node_config"].get("SecurityGroupIds") for name, t in cluster["available_node_types"].items()}
    assert len({tuple(g or ()) for g in groups.values()}) == 1 and all(groups.values()), groups
    text = (ROOT / "cluster.yaml").read_text()
    (edit,) = [line for line in text.splitlines() if "# EDIT" in line]
    assert "SecurityGroupIds" in edit
    # how to make it: SSH from one network, and every port among the nodes themselves
    assert re.search(r"aws ec2 create-security-group .*--group-name", text)
    assert re.search(r"authorize-security-group-ingress .*\n#.*--protocol tcp --port 22 --cidr", text)
    assert re.search(r"authorize-security-group-ingress .*\n#.*--protocol all --source-group", text)
    assert "0.0.0.0/0" not in yaml.safe_dump(cluster)


def test_no_credentials_in_the_config(cluster):
    assert "aws_credentials" not in cluster["provider"]  # Ray would copy them to the head
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", text, re.I)


def test_node_paths_are_in_the_image_users_home(cluster):
    """The container's user is `ray` (/home/ray), the AMI's `ubuntu`: paths under ~ exist for either."""
    assert all(remote.startswith("~/") for remote in cluster["file_mounts"]), cluster["file_mounts"]
    text = (ROOT / "cluster.yaml").read_text()
    assert "/home/" not in text.split("file_mounts:")[1] and "--results '~/results'" in text


def test_the_install_gives_a_head_the_dashboard_and_the_jobs_api():
    # what Ray imports to decide between the full dashboard (HTTP server, jobs API) and the minimal one
    # without them (ray._private.utils.get_dashboard_dependency_error): ray[default] brings it
    import ray.dashboard.optional_deps  # noqa: F401


def test_the_slurm_script_asks_for_sigterm_before_the_time_limit():
    directives = dict(
        line.removeprefix("#SBATCH --").partition("=")[::2]
        for line in (ROOT / "cluster-slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH --")
    )
    # to the batch shell (B:), which passes it on to the sweep (tests/sweep/test_slurm.py), minutes ahead
    where, before = directives["signal"].split("@")
    assert where == "B:TERM" and int(before) >= 60
    assert directives["ntasks-per-node"] == "1"  # one Ray node per SLURM node


def test_the_cluster_page_gives_each_path_and_submits_jobs_through_the_forwarded_dashboard():
    section = (ROOT / "docs" / "cluster.md").read_text()
    for config in ("cluster.yaml", "cluster-onprem.yaml"):
        for step in ("ray up", "ray dashboard", "ray rsync-down", "ray down"):
            assert re.search(rf"^{step} (-y )?{config}", section, re.M), (step, config)
    submits = [line for line in section.splitlines() if line.startswith("ray job submit")]
    assert len(submits) == 2
    for submit in submits:
        assert "--address http://127.0.0.1:8265" in submit and "--address auto" in submit
    assert re.search(r"^sbatch .*cluster-slurm\.sbatch", section, re.M)
    for package in ("openssh-server", "rsync", "slurm-wlm", "munge"):  # what .ci/run installs
        assert f"`{package}`" in section and package in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_exactly_the_readmes_test_command():
    """.ci/run's last line is the README's test command, character for character: an install step the
    README lacks fails CI, and a faster command measured in CI is the one users type."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Install and run the tests:", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert "\n" not in command and ci_lines[-1] == command
