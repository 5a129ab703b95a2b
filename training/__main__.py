"""``python -m training``: train, export and evaluate checkpoints."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch


def _cmd_train(args) -> int:
    from .data import ConfigError
    from .trainer import (RunExistsError, check_architecture, check_training_data, load_config, train,
                          training_objective)

    try:
        config = load_config(args.config)
        if args.packed:
            config["data"]["packed"] = args.packed
        if args.max_minutes is not None:
            config["train"]["max_minutes"] = args.max_minutes
        check_training_data(config)
        training_objective(config)
        check_architecture(config.get("architecture"))
    except (ConfigError, FileNotFoundError) as exc:  # one line naming the file, no traceback
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: data config OK")
        return 0
    try:  # a GPU asked for on a machine without one: one line before anything loads
        from napari_mediffuse.engine.devices import select_device

        select_device(args.device)
    except ValueError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    command = "python -m training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:  # an --output holding a run is refused before anything loads (train() checks it first)
        folder = train(config, args.output, resume=args.resume, device=args.device,
                       precision=args.precision, max_steps=args.max_steps, command=command)
    except RunExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"EMA checkpoint: {folder}")
    return 0


def _cmd_pack(args) -> int:
    from .data import ConfigError
    from .pack import write_pack
    from .trainer import load_config

    try:
        counts = write_pack(load_config(args.config), args.output, slice_step=args.slice_step)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    size = Path(args.output).stat().st_size / 2**20
    print(f"{args.output}: " + ", ".join(f"{n} {split} volumes" for split, n in counts.items()) + f", {size:.1f} MiB")
    return 0


def _cmd_export(args) -> int:
    """Copy a run's EMA checkpoint into the plugin format, with evaluation metrics."""
    import yaml

    from napari_mediffuse.engine.checkpoint import load_checkpoint, save_checkpoint

    run = Path(args.run)
    checkpoint = load_checkpoint(run / "ema")
    card = dict(checkpoint.card)
    config = yaml.safe_load((run / "config.yaml").read_text())
    if args.regions:  # where its evaluation showed it works: the tasks warn elsewhere (tasks.domain)
        from napari_mediffuse.tasks.domain import model_domain

        trained = model_domain(card)["regions"]
        wrong = sorted(set(args.regions) - set(trained))
        if wrong:
            print(f"error: --regions: {', '.join(wrong)} not among the regions {run} trained on "
                  f"({', '.join(trained) or 'none stated'})", file=sys.stderr)
            return 2
        card["domain"] = dict(card.get("domain") or {}, regions=[r for r in trained if r in args.regions])
    if card["task"] == "ct_prior" and not args.skip_evaluation:
        from .evaluate_prior import one_step_denoising

        card["metrics"] = {**card.get("metrics", {}),
                           "one_step_denoising_heldout": one_step_denoising(checkpoint.network, config)}
    from .trainer import card_domain

    for key, value in card_domain(config).items():  # runs exported before the card had it
        card.setdefault(key, value)
    dtype = torch.float16 if args.fp16 else torch.float32
    save_checkpoint(args.output, checkpoint.network, card, dtype=dtype, overwrite=args.overwrite)
    print(json.dumps(card["metrics"], indent=2))
    print(f"exported {args.output}")
    return 0


def _cmd_evaluate_prior(args) -> int:
    from napari_mediffuse.engine.checkpoint import load_checkpoint

    from .evaluate_prior import one_step_denoising
    from .trainer import load_config

    from napari_mediffuse.engine.networks import REGIONS

    checkpoint = load_checkpoint(args.checkpoint)
    config = load_config(args.config)  # resolves base: configs
    region = REGIONS.index(args.region) if args.region else None
    results = one_step_denoising(checkpoint.network, config, max_slices=args.max_slices, region=region,
                                 structures=args.structures == "given")
    print(json.dumps({"checkpoint": str(args.checkpoint), "config": args.config, "region": args.region,
                      "structures": args.structures if checkpoint.network.condition_channels else None,
                      **results}, indent=2))
    return 0


def _cmd_plot_log(args) -> int:
    from .report import loss_curve

    print(loss_curve(args.run, args.output))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (torchrun for several processes)")
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True, help="run folder (state, log, EMA checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/state.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--precision", default="auto", help="auto (bf16/fp16 AMP on GPU), fp32, fp16, bf16")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--max-minutes", type=float, help="override train.max_minutes: stop, save and export once the run has trained this long, "
                        "its earlier sessions included (raise it to continue a run with --resume)")
    p.add_argument("--check", action="store_true", help="check the config's data (files, patient split) and stop")
    p.add_argument("--packed", help="train from this pack (python -m training pack) instead of the config's files")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("pack", help="load a config's train and validation volumes into one .npz "
                                    "(to train where the files are not)")
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True, help=".npz file")
    p.add_argument("--slice-step", type=int, default=1,
                   help="keep every N-th axial slice (data kinds trained on single axial slices; "
                        "a smaller pack with every patient)")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("export", help="export a run's EMA weights as a plugin checkpoint")
    p.add_argument("run")
    p.add_argument("--output", required=True)
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-evaluation", action="store_true")
    p.add_argument("--regions", nargs="+", metavar="REGION",
                   help="the body regions the card states the model is for (its evaluation's verdict; "
                        "default: every region it trained on); the tasks warn on scans of others")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("evaluate-prior", help="one-step denoising PSNR of a CT prior on held-out slices")
    p.add_argument("checkpoint")
    p.add_argument("--config", required=True, help="the held-out data: data.validation, else held-out blocks")
    p.add_argument("--max-slices", type=int, default=16, help="slices (per region with data.validation)")
    p.add_argument("--structures", choices=["given", "unknown"], default="given",
                   help="a prior with anatomy channels: each slice's structures where its scan has them "
                        "(given), or none (unknown: what a new patient gets)")
    p.add_argument("--region", choices=["unknown", "head-neck", "chest", "abdomen"],
                   help="region class for every slice (default: each slice's own); e.g. abdomen for ct-prior-demo")
    p.set_defaults(func=_cmd_evaluate_prior)

    p = sub.add_parser("plot-log", help="PNG of a run's training and validation loss")
    p.add_argument("run")
    p.add_argument("output")
    p.set_defaults(func=_cmd_plot_log)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
