"""s3:// data roots against a real S3 API (moto's server on 127.0.0.1): staged once per node, reused."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from pyarrow import fs

from flowbench import FlowbenchError
from flowbench.data import load_dataset
from tests.data.test_files import write_cifar_folder

pytest.importorskip("moto.server", reason="moto[server] (the test extras) runs the S3 API")


@pytest.fixture(scope="module")
def s3_uri(tmp_path_factory):
    """s3://data/... URIs of a moto server on a free loopback port; its bucket created first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = pytest.MonkeyPatch()  # moto takes any credentials; pyarrow must find some
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        env.setenv(name, value)
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    s3 = fs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
        connect_timeout=1,
        request_timeout=2,
    )
    try:
        for _ in range(120):
            try:
                s3.create_dir("data")
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("moto server did not answer within 60 s")
        yield s3, lambda key: f"s3://data/{key}?{options}"
    finally:
        env.undo()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def upload_cifar(tmp_path, s3, key):
    local = tmp_path / "local"
    write_cifar_folder(local)
    fs.copy_files(str(local), f"data/{key}", destination_filesystem=s3)
    return local


def same_splits(a, b):
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(a, split).array, getattr(b, split).array)


def test_an_s3_root_loads_what_the_local_copy_loads(tmp_path, s3_uri):
    s3, uri = s3_uri
    local = upload_cifar(tmp_path, s3, "cifar")
    same_splits(load_dataset("cifar10", uri("cifar")), load_dataset("cifar10", local))


def test_trials_on_one_node_stage_the_root_once_and_reuse_it(tmp_path, s3_uri, cache_dir):
    s3, uri = s3_uri
    upload_cifar(tmp_path, s3, "once")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s'); "
        "from flowbench.data import load_dataset; print(len(load_dataset('cifar10', sys.argv[1]).train))"
    )
    env = os.environ | {"FLOWBENCH_CACHE_DIR": str(cache_dir)}
    trials = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri("once")],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = [t.communicate(timeout=300) for t in trials]
    assert [t.returncode for t in trials] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["18"] * 3  # 20 training rows, 2 for validation
    staging = [
        line for _, err in outputs for line in err.splitlines() if line.startswith("flowbench.data.remote staging")
    ]
    assert len(staging) == 1, staging  # three trials started together, one download

    s3.delete_dir("data/once")  # the staged copy is what later trials read
    assert len(load_dataset("cifar10", uri("once")).train) == 18


def test_a_missing_s3_root_is_one_line_naming_it(s3_uri):
    _, uri = s3_uri
    with pytest.raises(FlowbenchError, match=r"data_roots.cifar10: nothing at s3://data/absent") as err:
        load_dataset("cifar10", uri("absent"))
    assert "\n" not in str(err.value)
