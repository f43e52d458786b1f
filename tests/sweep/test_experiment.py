"""Parts of flowbench.sweep.experiment that need no Ray running."""

import platform
import subprocess
import sys

import ray.cloudpickle

from flowbench.sweep.experiment import ReturnFreedMemory, _malloc_trim


def test_the_callback_that_returns_freed_memory_survives_tunes_pickling_and_trims():
    """Tune pickles its callbacks with the experiment's state: a ctypes handle in one fails the sweep."""
    callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(ReturnFreedMemory()))
    callback.on_trial_complete(0, [], None)
    callback.on_trial_error(0, [], None)
    if platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None


def test_native_writes_to_stderr_go_to_the_sweep_log_and_python_ones_to_the_terminal(tmp_path):
    """Inside ray_log_to, what native code writes to descriptor 2 (Arrow's S3 client once a storage is
    gone, Ray's C++ core) lands in the log; flowbench's own lines, printed or logged, on the terminal;
    after the block descriptor 2 is the terminal again."""
    log = tmp_path / "sweep.log"
    script = f"""
import gc, logging, os, sys
from pathlib import Path
from flowbench.sweep.experiment import ray_log_to
logging.basicConfig(format="%(message)s")
class Noisy:  # a native object that complains to descriptor 2 when destroyed, as Arrow's streams do
    def __del__(self):
        os.write(2, b"native: destroyed\\n")
with ray_log_to(Path({str(log)!r})):
    os.write(2, b"native: during\\n")
    print("printed: during", file=sys.stderr)
    logging.getLogger("flowbench.sweep").warning("logged: during")
    noisy = Noisy(); noisy.cycle = noisy; del noisy  # freed by a collection, not at once
os.write(2, b"native: after\\n")
print("printed: after", file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["printed: during", "logged: during", "native: after", "printed: after"]
    assert {"native: during", "native: destroyed"} <= set(log.read_text().splitlines())
