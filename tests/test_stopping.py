"""flowbench.stopping in this process: the first SIGINT or SIGTERM asks for a stop, a second one
stops at once, and the CLI's exit status is 128 + the signal's number."""

import os
import signal
import time

import pytest

from flowbench import stopping


def delivered(signum: int) -> None:
    """Send ``signum`` to this process and let Python run its handler (between two bytecodes)."""
    os.kill(os.getpid(), signum)
    time.sleep(0.2)


def test_the_first_signal_asks_for_a_stop_and_the_second_stops_at_once():
    before = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    with stopping.StopRequest() as stop:
        assert stopping.current() is stop and not stopping.requested()
        stop.check("while nothing was asked")  # no stop asked: nothing raised
        delivered(signal.SIGTERM)
        assert stopping.requested() and stop.signum == signal.SIGTERM
        with pytest.raises(stopping.Interrupted) as second:
            delivered(signal.SIGINT)
        assert str(second.value).startswith("stopped at once by a second SIGINT")
        assert second.value.exit_status == 130 and second.value.resumable
        with pytest.raises(stopping.Interrupted) as checked:
            stop.check("while testing", resumable=False)
        assert str(checked.value) == "interrupted by SIGTERM while testing"
        assert checked.value.exit_status == 143 and not checked.value.resumable
    assert stopping.current() is None and not stopping.requested()
    assert {s: signal.getsignal(s) for s in stopping.SIGNALS} == before  # the handlers it found, back
