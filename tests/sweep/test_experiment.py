"""Parts of flowbench.sweep.experiment that need no Ray running."""

import platform

import ray.cloudpickle

from flowbench.sweep.experiment import ReturnFreedMemory, _malloc_trim


def test_the_callback_that_returns_freed_memory_survives_tunes_pickling_and_trims():
    """Tune pickles its callbacks with the experiment's state: a ctypes handle in one fails the sweep."""
    callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(ReturnFreedMemory()))
    callback.on_trial_complete(0, [], None)
    callback.on_trial_error(0, [], None)
    if platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
