import pytest


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Each test prepares its caches in a folder of its own (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FLOWBENCH_CACHE_DIR", str(path))
    return path
