"""Stopping in order across the cluster: the driver's ``StopBroadcast`` actor, and each trial's wait
for it (``stop_asked``).

A module of its own, importing nothing heavy: the actor's worker process imports it to run the
actor, and a sweep's broadcast otherwise cost a whole torch import (2.7 of a tiny sweep's 20 CPU
seconds).
"""

from __future__ import annotations

import asyncio
import threading


def stop_broadcast_name(experiment: str) -> str:
    """The driver's StopBroadcast of ``experiment``: named by its Ray job (the driver and its trials
    share it), so a later driver of the same experiment never meets one that is still going away."""
    import ray

    return f"flowbench-stop-{ray.get_runtime_context().get_job_id()}-{experiment}"


class StopBroadcast:
    """A Ray actor of the driver's (named ``stop_broadcast_name``): ``ask`` tells every trial of
    the experiment, each waiting in ``wait``, to checkpoint where it is and stop. Async, so all
    the waits are pending at once and an ``ask`` answers them together."""

    def __init__(self) -> None:
        self._asked = asyncio.Event()

    async def wait(self) -> None:
        await self._asked.wait()

    async def ask(self) -> None:
        self._asked.set()


_stop_asked: dict[str, threading.Event] = {}  # per broadcast: one waiting thread a process, however many trials


def stop_asked(experiment: str) -> threading.Event:
    """Set once the driver asks the experiment's trials to stop (``StopBroadcast``); never set
    when the driver holds none."""
    name = stop_broadcast_name(experiment)
    if name not in _stop_asked:
        import ray

        event = _stop_asked[name] = threading.Event()
        try:
            broadcast = ray.get_actor(name)
        except ValueError:
            return event

        def wait() -> None:
            try:
                ray.get(broadcast.wait.remote())
            except ray.exceptions.RayError:  # the driver has gone: nobody left to stop for
                return
            event.set()

        threading.Thread(target=wait, name="flowbench-stop", daemon=True).start()
    return _stop_asked[name]
