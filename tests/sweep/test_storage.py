"""--storage as Tune gets it: a folder as is, an S3 URI as pyarrow's filesystem and path (moto's server)."""

import pytest

from flowbench.errors import FlowbenchError
from flowbench.sweep.storage import tune_storage
from tests.data.test_remote import s3_uri  # noqa: F401 -- the moto server fixture


def test_a_folder_is_tunes_own_local_storage(tmp_path):
    assert tune_storage(str(tmp_path)) == (None, str(tmp_path))


def test_an_s3_uri_becomes_pyarrows_filesystem_and_path(s3_uri):  # noqa: F811
    s3, uri = s3_uri
    filesystem, path = tune_storage(uri("sweeps/tune/"))
    assert path == "data/sweeps/tune"
    with filesystem.open_output_stream(f"{path}/probe") as f:  # the same store the test's client sees
        f.write(b"written through --storage")
    with s3.open_input_stream("data/sweeps/tune/probe") as f:
        assert f.read() == b"written through --storage"


def test_a_missing_bucket_is_refused_in_one_line(s3_uri):  # noqa: F811
    _, uri = s3_uri
    with pytest.raises(FlowbenchError, match="bucket 'nobucket' does not exist there; create it first"):
        tune_storage(uri("x").replace("s3://data/", "s3://nobucket/"))


def test_credentials_in_the_uri_are_refused_without_echoing_them():
    with pytest.raises(FlowbenchError, match="set AWS_ACCESS_KEY_ID") as err:
        tune_storage("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/prefix")
    assert "wJalrXUtnFEMI" not in str(err.value) and "AKIDEXAMPLE" not in str(err.value)


def test_an_option_pyarrow_does_not_know_is_named():
    with pytest.raises(FlowbenchError, match="Unexpected query parameter.*'colour'"):
        tune_storage("s3://bucket/prefix?colour=blue")
