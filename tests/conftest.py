"""How the suite shares the machine: pytest-xdist's workers (``--dist loadgroup``, pyproject's
addopts), each with one intra-op thread.

Each test is its own unit of work, except the tests of a file that share a module-scoped fixture
(a local Ray, a two-node cluster, a built wheel): those go to one worker together, so the fixture
starts once. The ``slow`` tests are handed out first: a long test started last would leave the
other workers idle while it runs.
"""

import os
import sys

import pytest

# Set before torch starts, and inherited by every process a test starts (CLI runs, spawned ranks;
# Ray gives its 1-CPU workers one thread anyway): the workers, their subprocesses and Ray's
# outnumber the cores, and OpenMP threads that share oversubscribed cores wait on each other at
# every parallel region: the tests' tiny models took 4-12x longer on two threads (docs/testing.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The test command installs with `pip install --no-compile`: pip compiles every module it installs on
# one core (some 45 of its 70 s), while the suite imports a tenth of them. Its processes compile what
# they import once and keep it, even where PYTHONDONTWRITEBYTECODE is set (as on this project's
# machines), which would have each of the suite's hundreds of processes compile its imports again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses a fixture of this suite (not a plugin's: their ``baseid`` is empty)
    that lives longer than one test."""
    fixtures = getattr(item, "_fixtureinfo", None)
    definitions = fixtures.name2fixturedefs.values() if fixtures is not None else []
    return any(d.baseid and d.scope != "function" for defs in definitions for d in defs)


def pytest_itemcollected(item: pytest.Item) -> None:
    """The group of a test that shares a module fixture: marked as it is collected, before any
    ``pytest_collection_modifyitems`` (xdist's reads the marks there, in each worker, whose own
    ``dist`` is "no": its ``loadgroup`` option says the groups count)."""
    if getattr(item.config.option, "loadgroup", False) and _shares_a_module_fixture(item):
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_groups = {
        mark.args[0] for item in items if item.get_closest_marker("slow") for mark in item.iter_markers("xdist_group")
    }

    def started_late(item: pytest.Item) -> bool:
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        return not (item.get_closest_marker("slow") or groups & slow_groups)

    items.sort(key=started_late)  # stable: the collection's order within each part
