"""--storage as Tune gets it: a folder as is, an S3 URI as pyarrow's filesystem and path (moto's server)."""

import json

import pyarrow.fs
import pytest
import torch

from flowbench.errors import FlowbenchError
from flowbench.sweep.storage import stored_checkpoints, tune_storage
from flowbench.sweep.worker import ATTEMPTS_FILE, CURVE_FILE, whole_checkpoint
from flowbench.trial import CHECKPOINT_FILE
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


def _trial_checkpoints(folder, cut_short: dict[str, str]) -> None:
    """A trial's checkpoints at steps 10, 20, 30 (an evaluation each) as the trial writes them;
    ``cut_short`` names checkpoint -> the file a killed upload cut in half."""
    for step in (10, 20, 30):
        name = f"checkpoint_{step // 10:06d}"
        ckpt = folder / name
        ckpt.mkdir(parents=True)
        torch.save({"model": {}, "config": {}, "progress": {"step": step}}, ckpt / CHECKPOINT_FILE)
        (ckpt / CURVE_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(10, step + 1, 10)))
        (ckpt / ATTEMPTS_FILE).write_text(json.dumps({"how": "fresh", "at": 0.0}) + "\n")
        if name in cut_short:
            broken = ckpt / cut_short[name]
            broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_newest_whole_checkpoint_an_earlier_experiment_left_is_found(tmp_path, s3_uri, where):  # noqa: F811
    """What a trial resumes from when Tune's saved state names a checkpoint deleted since: the newest
    whole one in storage; one whose upload a killed driver cut short is passed over."""
    made = tmp_path / "made" / "exp" / "glow-digits-seed0"
    # the newest one's curve and the next one's weights were cut short: the oldest is whole
    _trial_checkpoints(made, {"checkpoint_000003": CURVE_FILE, "checkpoint_000002": CHECKPOINT_FILE})
    if where == "folder":
        storage = str(tmp_path / "made")
    else:
        s3, uri = s3_uri
        storage = uri("killed")
        filesystem, root = tune_storage(storage)
        pyarrow.fs.copy_files(
            str(tmp_path / "made"), root, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=s3
        )
    paths = stored_checkpoints(storage, "exp", "glow-digits-seed0")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["checkpoint_000003", "checkpoint_000002", "checkpoint_000001"]
    assert stored_checkpoints(storage, "exp", "never-ran") == []
    found = whole_checkpoint(paths, storage, tmp_path / "trial")
    assert found is not None and torch.load(found / CHECKPOINT_FILE)["progress"]["step"] == 10
    assert whole_checkpoint(paths[:2], storage, tmp_path / "other") is None  # none whole: the trial starts afresh
