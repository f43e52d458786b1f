"""Stopping in order on a signal: SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch scheduler's time
limit or ``scancel``, Kubernetes) ask the running command to stop at its next safe point (a
trial checkpoints its current step first); a second signal stops it at once.

Signal handlers belong to a process, so the request does too: the CLI holds a ``StopRequest``
around a command, and the code that can stop in order asks ``requested()`` (a Ray Tune callback
restored from an experiment's saved state finds it here as well). No Ray, no MLflow.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_current: StopRequest | None = None


class Interrupted(BaseException):
    """A command stopped by a signal. A BaseException, like KeyboardInterrupt, so no ``except
    Exception`` on the way up (Tune's, a library's) takes it for an error of its own. The CLI
    prints the message in one line, with how to resume when ``resumable``, and exits with 128 +
    the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str, resumable: bool = True):
        super().__init__(message)
        self.signum, self.resumable = signum, resumable

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """SIGINT and SIGTERM as a request to stop while the block runs: the first sets it, the
    second raises ``Interrupted`` wherever the process is (files are written atomically, and
    a trial resumes from its last checkpoint)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._asked = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        global _current
        self._previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        _current = self
        return self

    def __exit__(self, *exc) -> None:
        global _current
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        _current = None

    def handle(self, signum: int, frame=None) -> None:
        if self._asked.is_set():
            raise Interrupted(
                signum, f"stopped at once by a second {signal.Signals(signum).name}, trials at their last checkpoint"
            )
        self.signum = signum
        self._asked.set()
        log.info("%s received: stopping in order", signal.Signals(signum).name)

    def is_set(self) -> bool:
        return self._asked.is_set()

    def check(self, when: str, resumable: bool = True) -> None:
        """Raise ``Interrupted`` ("interrupted by SIGNAL {when}") if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum, f"interrupted by {signal.Signals(self.signum).name} {when}", resumable)


def current() -> StopRequest | None:
    """The stop request this process holds, if any."""
    return _current


def requested() -> bool:
    return _current is not None and _current.is_set()
