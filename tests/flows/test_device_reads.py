"""A training forward + backward of every registered model, after initialisation, asks the device
for nothing: no operator that makes the host wait for a GPU's result.

Counted at the ATen level (a TorchDispatchMode sees every operator, the backward's included), so
the reads torch makes inside a call are found too: a scalar read (``.item()``, ``bool``, ``int``),
the error check of ``linalg.inv``/``solve``, ``nonzero``, boolean indexing, ``unique``. The
Python-level spelling of reads (``.cpu()``, ``.numpy()``, …) in whole training steps is counted
by tests/test_host_syncs.py.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowbench
from flowbench.flows import ActNorm, model_entry

SYNCING = {
    "aten._local_scalar_dense",
    "aten._linalg_check_errors",
    "aten.nonzero",
    "aten.masked_select",
    "aten.equal",
    "aten.is_nonzero",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}


class CountDeviceReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCING:
            self.reads.append(name)
        elif name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.append("boolean index")  # its result's size is the mask's count: read from the device
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_reads_inside_torch_calls():
    x = torch.eye(3, requires_grad=True)
    with CountDeviceReads() as counter:
        torch.linalg.inv(x).sum().backward()
        bool(x.sum() > 0)
        x[x > 0.5]
    assert counter.reads == ["aten._linalg_check_errors", "aten._local_scalar_dense", "boolean index"]


VARIANTS = [(name, {}) for name in flowbench.list_models()] + [("glow", {"lu": True}), ("nxn_shift", {"lu": True})]


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=[f"{n}-{'-'.join(e) or 'card'}" for n, e in VARIANTS])
def test_training_forward_and_backward_make_no_device_read(name, extra):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **model_entry(name).tiny, **extra).train()
    pixels = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    model.bits_per_dim(pixels)  # initialisation: ActNorm's data-dependent values
    with CountDeviceReads() as counter:
        model.bits_per_dim(pixels).mean().backward()
    assert counter.reads == []


def test_actnorm_initialisation_is_a_python_flag_restored_with_the_state_dict():
    layer = ActNorm(2).train()
    assert not layer.is_initialized
    layer(torch.randn(8, 2, 4, 4) * 5)
    assert layer.is_initialized
    with CountDeviceReads() as counter:
        layer(torch.randn(8, 2, 4, 4))
    assert counter.reads == []  # the flag, not the buffer, is what forward reads
    loaded = ActNorm(2)
    loaded.load_state_dict(layer.state_dict())
    assert loaded.is_initialized and list(layer.state_dict()) == ["bias", "log_scale", "initialized"]
    fresh = ActNorm(2)
    fresh.load_state_dict(ActNorm(2).state_dict())  # an uninitialised layer's checkpoint stays uninitialised
    assert not fresh.is_initialized
