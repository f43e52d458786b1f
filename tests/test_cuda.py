"""The GPU subset (``pytest -m gpu``; skipped where CUDA is absent): what the CPU suite shows,
shown again on CUDA, plus what only a GPU has (TF32, CUDA memory, Ray GPU scheduling, nccl)."""

import copy

import pytest
import torch

import flowbench
from flowbench.flows.conv1x1 import InvConv1x1
from flowbench.flows.emerging import EmergingConv2d
from flowbench.flows.periodic import PeriodicConv2d
from flowbench.flows.shift import InvertibleNxNConv
from tests.flows.harness import check_flow, prepare
from tests.flows.test_checkpointing import loss_and_grads
from tests.flows.test_mixed_precision import check_bf16_couplings
from tests.flows.test_models import TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", sorted(TINY))
def test_models_pass_the_harness_on_cuda(name):
    check_flow(lambda: flowbench.build_model(name, (3, 8, 8), **TINY[name]), shape=(3, 8, 8), scale=0.05, device=CUDA)


@pytest.mark.parametrize("name", sorted(TINY))
def test_cuda_computes_what_the_cpu_computes(name):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **TINY[name]).double()
    cpu = prepare(model, torch.rand(8, 3, 8, 8, dtype=torch.float64) - 0.5, scale=0.05)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    with torch.no_grad():
        eps, logdet = cpu.encode(x)
        eps_gpu, logdet_gpu = gpu.encode(x.to(CUDA))
        back = gpu.decode(eps_gpu)
    torch.testing.assert_close(eps_gpu.cpu(), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_gpu.cpu(), logdet, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.cpu(), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda c: InvConv1x1(c),
        lambda c: InvertibleNxNConv(c, lu=True),
        lambda c: EmergingConv2d(c),
        lambda c: PeriodicConv2d(c),
    ],
    ids=["conv1x1", "nxn_shift", "emerging", "periodic"],
)
def test_invertible_convs_stay_float32_where_cudnn_allows_tf32(make):
    """TF32 (cuDNN's float32 default on Ampere and later) would be off by ~1e-3; float32 is ~1e-6."""
    torch.manual_seed(0)
    layer = prepare(make(64).double(), torch.randn(4, 64, 8, 8, dtype=torch.float64))
    x = torch.randn(4, 64, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        exact, _ = layer(x)
        previous, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, True
        try:
            fast, _ = layer.float().to(CUDA)(x.float().to(CUDA))
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    error = (fast.double().cpu() - exact).abs().max() / exact.abs().max()
    assert error < 1e-5, f"relative error {error:.1e}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_coupling_nets_keep_the_flow_exact_on_cuda(name):
    check_bf16_couplings(name, CUDA)


def test_checkpointing_on_cuda_gives_the_same_gradients_in_less_memory():
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 32, 32), depth=8, levels=3, hidden_channels=128).to(CUDA).train()
    pixels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    model.bits_per_dim(pixels)  # ActNorm initialisation
    lean = copy.deepcopy(model)
    lean.set_gradient_checkpointing(True)

    def peak_mb(net):
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, grads = loss_and_grads(net, pixels)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, loss, grads

    plain_mb, loss, grads = peak_mb(model)
    lean_mb, lean_loss, lean_grads = peak_mb(lean)
    # float32 on cuDNN: the recomputed forward may pick another algorithm, so ~1e-5, not bit-equal
    torch.testing.assert_close(lean_loss, loss, rtol=1e-5, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(lean_grads[key], grads[key], rtol=1e-3, atol=1e-4)
    assert lean_mb < 0.5 * plain_mb, (lean_mb, plain_mb)


def test_trial_on_cuda_matches_cpu(tmp_path):
    from flowbench.trial import run_trial
    from tests.test_trial import config

    cpu = run_trial(config(tmp_path / "cpu", budget=5, device="cpu"))
    gpu = run_trial(config(tmp_path / "gpu", budget=5, device="cuda"))
    assert gpu.device.startswith("cuda") and gpu.memory_kind == "cuda_allocated" and gpu.status == "ok"
    assert gpu.test_bpd == pytest.approx(cpu.test_bpd, abs=0.05)


def test_a_sweep_schedules_its_trials_on_the_gpu(tmp_path):
    ray = pytest.importorskip("ray", reason="the with-Ray tier: a bare GPU machine has no Ray")

    from flowbench.sweep.driver import run_sweep

    spec = tmp_path / "gpu.yaml"
    spec.write_text("""\
name: gpu
models: [glow, emerging]
datasets: [digits]
budget: {steps: 10}
train: {batch_size: 32, evaluations: 2}
overrides:
  glow: {depth: 2, levels: 2, hidden_channels: 8}
  emerging: {depth: 2, levels: 2, hidden_channels: 8}
resources: {cpu: 1, gpu: 1}
latency: {batch_sizes: [1, 4], rounds: 2, warmup: 1}
""")
    try:
        outcome = run_sweep(spec, tmp_path / "results", num_cpus=2)
    finally:
        ray.shutdown()
    assert (outcome.trials.status == "ok").all() and outcome.trials.device.str.startswith("cuda").all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_workers_reach_the_one_gpu_result(tmp_path):
    ray = pytest.importorskip("ray", reason="the with-Ray tier: a bare GPU machine has no Ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flowbench.sweep.experiment import start_ray
    from flowbench.sweep.worker import ddp_worker
    from flowbench.trial import TrialConfig, run_trial

    config = dict(
        model="glow",
        dataset="digits",
        hparams=dict(depth=2, levels=2, hidden_channels=8),
        seed=3,
        batch_size=32,
        budget=6,
        evaluations=2,
    )
    single = run_trial(TrialConfig(**config, out_dir=str(tmp_path / "single"), device="cuda"))
    start_ray(None)
    try:
        result = TorchTrainer(
            ddp_worker,
            train_loop_config={"trial": config},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=True),
            run_config=RunConfig(name="nccl", storage_path=str(tmp_path / "train")),
        ).fit()
    finally:
        ray.shutdown()
    assert result.metrics["workers"] == 2 and result.metrics["device"].startswith("cuda")
    assert result.metrics["test_bpd"] == pytest.approx(single.test_bpd, rel=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_compiled_models_pass_the_harness_on_cuda(name):
    from tests.test_compile import check_compiled_flow

    check_compiled_flow(name, CUDA)


def test_compiled_trial_on_cuda_trains_as_eager(tmp_path):
    """cuDNN may pick other convolution algorithms for the compiled graph (and TF32 in the coupling
    networks, as the user's setting allows): bits/dim agree to 1e-3, not to float32's round-off."""
    from tests.test_compile import assert_same_training, run

    eager, _ = run(tmp_path / "eager", device="cuda")
    compiled, graphs = run(tmp_path / "compiled", device="cuda", compile=True)
    assert compiled.compile_seconds > 0 and graphs[0] == graphs[-1]
    assert_same_training(eager, compiled, rel=1e-3)
