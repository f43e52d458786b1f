"""A steady-state training step reads nothing from the device: every model, after initialisation.

On CUDA a device-to-host read stalls the host until the GPU drains its queue; on the CPU the
same calls are how such reads are spelled, so counting them here finds them before a GPU does
(tests/test_cuda.py runs the same steps under torch.cuda.set_sync_debug_mode("error")).
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flowbench
from flowbench.trial import LossMeter, Shard, prepare_training, train_step

READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}
TINY = {"realnvp": dict(levels=2, hidden_channels=8, n_blocks=1)}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_a_read():
    with CountHostReads() as counter:
        torch.ones(2).sum().item()
        bool(torch.ones(()) > 0)
    assert counter.reads == ["item", "__bool__"]


@pytest.mark.parametrize("name", flowbench.list_models())
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_steady_state_step_makes_no_host_read(name, grad_clip):
    torch.manual_seed(0)
    hparams = TINY.get(name, dict(depth=2, levels=2, hidden_channels=8))
    model = flowbench.build_model(name, (3, 8, 8), **hparams)
    optimizer = prepare_training(model, torch.device("cpu"), lr=1e-3)
    pixels = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    noise = torch.Generator().manual_seed(1)
    meter = LossMeter(torch.device("cpu"))
    model.train()
    train_step(model, optimizer, pixels, noise, grad_clip)  # initialisation: ActNorm, optimiser state
    with CountHostReads() as counter:
        for step in range(3):
            meter.add(train_step(model, optimizer, pixels, noise, grad_clip), step + 2)
    assert counter.reads == []
    mean, first_bad, _ = meter.read(Shard())
    assert first_bad is None and mean > 0  # the reads happen here, once per evaluation
