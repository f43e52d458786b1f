"""exact_conv2d's TF32 switch. On CPU only the flag handling can be checked (a tensor that says it
is on CUDA); tests/test_cuda.py checks the numbers on a GPU."""

import torch

from flowbench.flows import base


class ClaimsCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def test_exact_conv2d_turns_tf32_off_for_its_call_and_restores_the_setting(monkeypatch):
    cudnn = torch.backends.cudnn
    conv2d, seen = base.F.conv2d, []

    def recording_conv2d(x, *args, **kwargs):
        seen.append(cudnn.conv.fp32_precision)
        return conv2d(x.as_subclass(torch.Tensor), *args, **kwargs)

    monkeypatch.setattr(base.F, "conv2d", recording_conv2d)
    before = cudnn.conv.fp32_precision
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 1, 1)
    y = base.exact_conv2d(x.as_subclass(ClaimsCuda), w)
    assert seen == ["ieee"] and cudnn.conv.fp32_precision == before
    torch.testing.assert_close(y, conv2d(x, w))
    base.exact_conv2d(x, w)  # a real CPU tensor: convolved under the user's setting, untouched
    assert seen == ["ieee", before]
