import pytest

from flowbench.flows import registry


@pytest.fixture
def isolated_registry(monkeypatch):
    """Whatever a test registers or loads as a plugin is gone afterwards: the registry is as it was."""
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(registry, "_imported_plugins", set(registry._imported_plugins))
