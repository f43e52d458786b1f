"""Compiled training steps (``train: {compile: true}``, ``flowbench train --compile``).

A compiled trial trains as the eager one does, compiles one graph (at its start, timed apart from
the steps) and none after it, through evaluations, resumes and the record's test and latency
figures; its checkpoints are eager ones and resume either way. Compiling costs tens of seconds on
a cold CPU: the trials here share one tiny model and shape, so after the first compile Inductor's
on-disk cache serves the rest (each trial resets dynamo's in-memory cache, as a sweep's would).

The default suite keeps what a change to the compiled path must not break: the harness on one
compiled model, the compiled trial (exactness, one compile through evaluations and resumes, the
checkpoint format, resumes either way) and the one-line refusal. Each ``compile_all`` test costs
another cold compile (a CPU minute or more here): the harness on every other model, bfloat16
couplings with gradient checkpointing, and the compiled data-parallel trial. Run them with

    python -m pytest -m compile_all tests/test_compile.py

(and on CUDA, tests/test_cuda.py runs the compiled tests in the GPU check).
"""

import shutil

import pytest
import torch
import torch.distributed
import torch.multiprocessing
from torch._dynamo.utils import counters

import flowbench
from flowbench.cli import main
from flowbench.trial import CHECKPOINT_FILE, load_checkpoint, run_trial
from tests.flows.harness import assert_logdet_exact, prepare
from tests.flows.test_models import TINY as TINY_MODELS
from tests.test_trial import config

# one flow step a level: half the tiny model's graph, so half its compile time
SMALL = dict(hparams=dict(depth=1, levels=2, hidden_channels=8))


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


class Interrupt(Exception):
    pass


def run(path, resume_from=None, stop_at_checkpoint=False, **settings):
    """A 10-step trial (evaluations at 5 and 10, checkpoints with them); returns its record and the
    number of graphs dynamo had compiled at each of its evaluations."""
    graphs = []

    def report(metrics, checkpoint_dir):
        graphs.append(compiled_graphs())
        if stop_at_checkpoint and checkpoint_dir is not None:
            raise Interrupt

    trial = config(path, **(SMALL | dict(budget=10, evaluations=2) | settings))
    if stop_at_checkpoint:
        with pytest.raises(Interrupt):
            run_trial(trial, report, resume_from=resume_from)
        return None, graphs
    return run_trial(trial, report, resume_from=resume_from), graphs


def assert_same_training(a, b, rel):
    assert len(a.curve) == len(b.curve)
    for p, q in zip(a.curve, b.curve, strict=True):
        assert q["train_bpd"] == pytest.approx(p["train_bpd"], rel=rel)
        assert q["val_bpd"] == pytest.approx(p["val_bpd"], rel=rel)
    assert b.test_bpd == pytest.approx(a.test_bpd, rel=rel)


@pytest.mark.slow
def test_compiled_trial_trains_as_eager_compiles_once_and_resumes_either_way(tmp_path):
    """float32: Inductor fuses the elementwise work around oneDNN's convolutions and may reorder
    reductions (log-dets, the loss), so a step agrees with eager to float32 round-off, ~1e-7
    relative; 1e-5 over 10 Adam steps leaves room for that to grow, and is 100× below what one
    step changes bits/dim by."""
    eager, _ = run(tmp_path / "eager")
    start = compiled_graphs()
    compiled, graphs = run(tmp_path / "compiled", compile=True)
    # one graph, compiled before the first step (its time apart); evaluations, the final test
    # evaluation and latency run eager: nothing compiles after it
    assert graphs == [start + 1, start + 1] and compiled_graphs() == start + 1
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    assert compiled.config_hash == eager.config_hash  # how it runs, not what it is
    assert compiled.throughput_images_per_s == pytest.approx(compiled.images_seen / compiled.train_seconds)
    assert_same_training(eager, compiled, rel=1e-5)

    # checkpoints: the eager format (no _orig_mod. keys), the same tensors to round-off
    saved, reference = (load_checkpoint(tmp_path / run / "checkpoint")["model"] for run in ("compiled", "eager"))
    assert list(saved) == list(reference)
    for key in reference:
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-4, atol=1e-5)

    # a compiled trial stopped at step 5 resumes compiled (one more compile, none after it) and eager;
    # an eager one stopped there resumes compiled
    for stopped, compile in (("compiled", True), ("eager", False)):
        run(tmp_path / f"{stopped}-stopped", stop_at_checkpoint=True, compile=compile)
    shutil.copytree(tmp_path / "compiled-stopped", tmp_path / "compiled-stopped-again")
    resumes = {}
    for stopped, compile in (("compiled-stopped", True), ("compiled-stopped-again", False), ("eager-stopped", True)):
        checkpoint = tmp_path / stopped / "checkpoint" / CHECKPOINT_FILE
        assert load_checkpoint(checkpoint)["progress"]["step"] == 5
        before = compiled_graphs()
        resumes[stopped], graphs = run(tmp_path / stopped, resume_from=checkpoint, compile=compile)
        assert graphs == [before + compile]
    # the compile of the start and of the resume both counted
    assert resumes["compiled-stopped"].compile_seconds > resumes["compiled-stopped-again"].compile_seconds > 0
    assert resumes["eager-stopped"].compile_seconds > 0
    for resumed in resumes.values():
        assert_same_training(eager, resumed, rel=1e-5)


@pytest.mark.compile_all
def test_compile_with_bf16_couplings_and_gradient_checkpointing(tmp_path):
    """Autocast regions and checkpointed flow steps compile into the one graph. bfloat16 couplings:
    Inductor keeps a fused chain of bfloat16 elementwise ops in float32 and rounds once at its
    end, where eager rounds after each op, so the two differ at bfloat16's ~4e-3: 1e-3 on bits/dim."""
    settings = dict(memory_saving=True, coupling_precision="bfloat16")
    eager, _ = run(tmp_path / "eager", **settings)
    start = compiled_graphs()
    compiled, graphs = run(tmp_path / "compiled", compile=True, **settings)
    assert graphs == [start + 1, start + 1] and compiled.status == "ok"
    assert_same_training(eager, compiled, rel=1e-3)


def check_compiled_flow(name: str, device="cpu") -> None:
    """The compiled map, float64 as the harness runs it: Inductor may sum in another order, which in
    float64 moves ε and the log-det by ~1e-13 (measured: 5.7e-14 on Glow's log-det): the harness's
    own tolerances (1e-9 round trip, 1e-7 log-det against the dense Jacobian) hold unchanged. The
    Jacobian is autograd's of the eager map: the reference is the map's exact log-det."""
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **TINY_MODELS[name]).to(device, torch.float64)
    prepare(model, torch.rand(8, 3, 8, 8, dtype=torch.float64, device=device) - 0.5, scale=0.05)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, device=device) - 0.5
    torch._dynamo.reset()
    start = compiled_graphs()
    compiled = torch.compile(model.flow, dynamic=False)
    with torch.no_grad():
        eps, logdet = compiled(x)
        eager_eps, eager_logdet = model.flow(x)
        back = model.flow.inverse(eps)
    assert compiled_graphs() > start  # it compiled (a graph break would leave it partly eager, still exact)
    torch.testing.assert_close(eps, eager_eps, atol=1e-9, rtol=0)
    torch.testing.assert_close(back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(logdet, eager_logdet, atol=1e-9, rtol=0)
    assert_logdet_exact(model, x)  # the eager log-det is the Jacobian's: so, within 1e-9, is the compiled one


# Glow's architecture (ActNorm, 1×1 convolutions, couplings, split and top priors, squeezes: what
# nxn_shift and periodic share) in the default suite; every model, at about a CPU minute each when
# Inductor's cache is cold, with `pytest -m compile_all` (and on CUDA in tests/test_cuda.py)
IN_DEFAULT_SUITE = ("glow",)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow if n in IN_DEFAULT_SUITE else pytest.mark.compile_all)
        for n in sorted(TINY_MODELS)
    ],
)
def test_compiled_models_pass_the_harness(name):
    check_compiled_flow(name)


def short_compiled(path):
    return config(path, **SMALL, budget=6, evaluations=2, compile=True)


def data_parallel_worker(rank: int, store: str, out: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        record = run_trial(short_compiled(f"{out}/rank{rank}"))
        results[rank] = (record.workers, record.test_bpd, record.compile_seconds)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.compile_all
def test_compiled_data_parallel_trial_reaches_the_one_process_result(tmp_path):
    """Two gloo processes (as Ray Train starts them in a sweep, here without Ray), each compiling
    the DDP-wrapped step, reach the compiled one-process trial's bits/dim."""
    single = run_trial(short_compiled(tmp_path / "single"))
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(
        data_parallel_worker, args=(str(tmp_path / "store"), str(tmp_path), results), nprocs=2, join=True
    )
    for rank in (0, 1):
        workers, test_bpd, compile_seconds = results[rank]
        assert workers == 2 and compile_seconds > 0
        assert test_bpd == pytest.approx(single.test_bpd, rel=1e-5)


def test_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch, capsys):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    code = main(
        ["train", "--model", "glow", "--dataset", "digits", "--compile", "--device", "cpu"]
        + ["--hparam", "depth=1", "--hparam", "levels=2", "--budget-steps", "2", "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("flowbench: error: compile: torch.compile needs a C++ compiler for Inductor")
    assert "no-such-g++" in err[0] and "train without compile" in err[0]
    assert not (tmp_path / "run" / "record.json").exists()
