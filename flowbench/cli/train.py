"""The one-model commands: ``models`` (the registry), ``train`` (one trial, no Ray), ``sample``, ``data prepare``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pydantic

from flowbench import stopping
from flowbench.cli.options import BUDGET_KINDS, cli_hparams, option_error
from flowbench.errors import FlowbenchError


def cmd_models(args) -> None:
    import flowbench
    from flowbench.cards import load_card

    rows = []
    for name in flowbench.list_models():
        card = load_card(name)
        hparams = card.hparams_for(args.dataset)
        model = flowbench.build_model(name, args.image_shape, **hparams)
        paper_bpd = card.paper_bpd(args.dataset)
        rows.append(
            (
                name,
                f"{model.num_parameters() / 1e6:.2f}M",
                f"{model.num_allocated_parameters() / 1e6:.2f}M",
                "—" if paper_bpd is None else f"{paper_bpd:.2f}",
                " ".join(f"{k}={v}" for k, v in hparams.items()),
                card.paper,
            )
        )
    # params: the entries that can change the map (what every report counts); allocated: all entries
    header = ("model", "params", "allocated params", f"paper bpd ({args.dataset})", "hparams", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"image shape {'x'.join(map(str, args.image_shape))}, hyperparameters of the {args.dataset} cards")
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cmd_train(args) -> None:
    from tqdm import tqdm

    from flowbench.atomic import atomic_write
    from flowbench.cards import load_card, training_settings
    from flowbench.data import dataset_info
    from flowbench.locks import exclusive_lock
    from flowbench.results.tables import curves_frame, trials_frame, write_table
    from flowbench.sweep.plan import data_fingerprint
    from flowbench.trial import CHECKPOINT_FILE, TrialConfig, TrialInterrupted, load_checkpoint, run_trial

    budgets = {k: getattr(args, f"budget_{k}") for k in BUDGET_KINDS}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) > 1:
        raise FlowbenchError(f"give one budget, got {', '.join('--budget-' + k for k in given)}")
    kind, amount = next(iter(given.items())) if given else ("steps", 500)
    hparams = load_card(args.model).hparams_for(args.dataset) | cli_hparams(args.model, args.hparam)
    out = Path(args.out or f"runs/{args.model}-{args.dataset}-seed{args.seed}")
    explicit = {
        k: getattr(args, k)
        for k in ("optimizer", "batch_size", "lr", "warmup_steps", "grad_clip")
        if getattr(args, k) is not None
    }
    if args.no_grad_clip:
        explicit["grad_clip"] = None
    train, source = training_settings(args.model, args.dataset, explicit)
    info = dataset_info(args.dataset, args.data_root)  # a missing data set is one line, before anything starts
    try:
        config = TrialConfig(
            model=args.model,
            dataset=args.dataset,
            hparams=hparams,
            seed=args.seed,
            budget_kind=kind,
            budget=amount,
            **train,
            recipe_source=source,
            data_fingerprint=data_fingerprint(info),
            evaluations=args.evaluations,
            memory_saving=args.memory_saving,
            coupling_precision=args.coupling_precision,
            numerics=args.numerics,
            compile=args.compile,
            data_root=args.data_root,
            device=args.device,
            out_dir=str(out),
            trial_id=out.name,
        )
    except pydantic.ValidationError as err:
        raise option_error(err, kind) from None
    if args.dry_run:
        settings = config.model_dump(exclude={"hparams", "data_fingerprint", "recipe_source"})
        shape = "x".join(map(str, info.image_shape))
        print(f"trial {config.trial_id} ({config.config_hash()}): {config.model} on {config.dataset} {shape}")
        print(f"  hparams  {' '.join(f'{k}={v}' for k, v in hparams.items())}")
        print(f"  settings {' '.join(f'{k}={v}' for k, v in settings.items() if k not in ('model', 'dataset'))}")
        return
    # one owner per output folder: a second train into it is refused, naming the first
    with exclusive_lock(out, "flowbench train"):
        checkpoint = out / "checkpoint" / CHECKPOINT_FILE
        resume = None
        if checkpoint.exists():
            if load_checkpoint(checkpoint)["config_hash"] != config.config_hash():
                raise FlowbenchError(f"{out} holds a trial of another configuration: use another --out or delete it")
            resume = checkpoint
            print(f"resuming from {checkpoint}", file=sys.stderr)

        # drawn from the first step on (an error before training prints alone) and moved every step;
        # its rate is the average since then (smoothing=0): wall time, evaluations included, so never
        # above the steps' own rate
        bars: list[tqdm] = []

        def step(spent: float) -> None:
            if not bars:
                bars.append(
                    tqdm(
                        total=amount,
                        initial=spent,
                        desc=f"{args.model} on {args.dataset}",
                        unit=kind,
                        smoothing=0,
                        file=sys.stderr,
                        disable=None,  # a terminal's: no carriage-return frames in a log file (SLURM's, a pipe's)
                    )
                )
            else:
                bars[0].update(spent - bars[0].n)

        def report(metrics, checkpoint_dir):
            bars[0].set_postfix(train_bpd=f"{metrics['train_bpd']:.3f}", val_bpd=f"{metrics['val_bpd']:.3f}")

        stop = stopping.current()
        try:
            record = run_trial(config, report, resume_from=resume, on_step=step, stop=stop.is_set if stop else None)
        except TrialInterrupted as interrupted:
            assert stop is not None, "only a stop request interrupts a trial"
            # the checkpoint folder holds that step: written now, or the one it resumed from or just wrote
            reached = interrupted.step
            stop.check(
                f"at step {reached}, checkpointed in {out / 'checkpoint'}" if reached else "before its first step"
            )
            raise
        finally:
            for bar in bars:
                bar.close()
        row = record.row()
        with atomic_write(out / "record.json") as tmp:  # the folder may not exist yet (diverged at step 1)
            tmp.write_text(json.dumps(row, indent=2))
        write_table(trials_frame([row]), out / "record.parquet", "trials")
        write_table(curves_frame([row], [record.curve]), out / "curve.parquet", "curves")
        if stop is not None:
            stop.check(f"after the trial had finished: its record is in {out}/record.json", resumable=False)
    if record.status != "ok":
        print(
            f"flowbench: {record.model} on {record.dataset} {record.status}: {record.reason}; "
            f"record in {out}/record.json",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"{record.model} on {record.dataset}: status ok")
    print(
        f"  test bits/dim   {record.test_bpd:.4f}   (selected on validation: {record.val_bpd:.4f} at step "
        f"{record.selected_step}; last train interval {record.train_bpd:.4f})"
    )
    print(
        f"  spent           {record.steps} steps, {record.images_seen} images, {record.epochs:.2f} epochs, "
        f"{record.train_flops:.3g} FLOPs ({record.flops_per_image:.3g} per image), "
        f"{record.train_seconds:.1f} s training ({record.throughput_images_per_s:.1f} images/s)"
        + (f", {record.compile_seconds:.1f} s compiling" if record.compile_seconds else "")
    )
    print(f"  recipe          {record.recipe}")
    print(f"  parameters      {record.num_params:,} effective ({record.num_params_allocated:,} allocated)")
    print(f"  peak memory     {record.peak_memory_mb:.0f} MB ({record.memory_kind})")
    print(f"  written         {out}/record.json, record.parquet, curve.parquet, checkpoint/")


def cmd_sample(args) -> None:
    import torch

    from flowbench.results.plots import image_grid, save_png
    from flowbench.trial import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(args.checkpoint)).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = model.images(model.sample(args.n, args.temperature, generator=gen))
    path = save_png(image_grid(images.numpy()), args.out, scale=args.scale)
    print(f"wrote {args.n} samples at temperature {args.temperature} to {path}")


def cmd_data_prepare(args) -> None:
    from flowbench.data import prepare_dataset

    cache, manifest, built = prepare_dataset(args.name, args.root, args.cache)
    sizes = ", ".join(f"{split} {n:,}" for split, n in manifest["splits"].items())
    shape = "x".join(map(str, manifest["image_shape"]))
    print(f"{args.name}: {'prepared' if built else 'already prepared, unchanged'} {cache}")
    print(f"  {sizes} images of {shape}, {manifest['n_bits']} bits, from {manifest['source']}")
    print(f"  trials find it from the same --data-root, or give --data-root {cache}")
