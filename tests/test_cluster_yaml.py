"""cluster.yaml as `ray up` reads it: Ray's defaults filled in, then Ray's own autoscaler schema."""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    """What `ray up cluster.yaml` works from: the file merged with the provider's defaults.yaml,
    setup commands merged, per-node-type worker bounds filled (Ray's prepare_config)."""
    return prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_passes_rays_autoscaler_schema(cluster):
    validate_config(cluster)  # ray/autoscaler/ray-schema.json, as `ray up` checks it
    broken = copy.deepcopy(cluster)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")  # a typo Ray must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def _ray_start_options(command: str) -> dict[str, str]:
    words = shlex.split(command.split(";")[-1])
    return dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--") and "=" in w)


def test_dashboard_and_jobs_api_stay_on_the_heads_loopback(cluster):
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


def test_every_node_installs_the_checkout_with_the_readmes_torch_pin(cluster):
    readme_pins = set(re.findall(r"torch==[\w.]+", (ROOT / "README.md").read_text()))
    assert len(readme_pins) == 1, readme_pins
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        (install,) = [c for c in commands if "flowbench" in c]
        words = shlex.split(install)
        assert words[:2] == ["pip", "install"] and mount in words and readme_pins <= set(words)
        assert "-e" not in words  # installed as the wheel is: package data, not the checkout's files


def test_readme_submits_jobs_through_the_forwarded_dashboard():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A Ray cluster", 1)[1].split("\n## ", 1)[0]
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray down cluster.yaml"):
        assert step in section
    submit = next(line for line in section.splitlines() if "ray job submit" in line)
    assert "--address http://127.0.0.1:8265" in submit
    assert "--address auto" in submit and "--storage s3://" in submit
