"""Sampling 2D images from an unconditional image prior (the 128x128 recipe).

A stack of new images, 20-step DDIM by default, as one napari image layer
(axis 0 = sample). The images are in the prior's normalised units mapped to
[0, 1]: such a prior has no physical intensity scale.
"""
from __future__ import annotations

import numpy as np

from ..engine.registry import load as load_model
from ..engine.inference import NoisePredictor
from ..engine.runner import SliceRunner
from ..engine.sampling import ddim_sample, randn
from .common import RunOptions, TaskInputError


def sample_images(count: int = 8, *, model=None, steps: int = 20, eta: float = 0.0,
                  options: RunOptions | None = None) -> np.ndarray:
    """Generate ``count`` images from an image prior.

    Parameters
    ----------
    count : int
        Number of images.
    model : str, optional
        Checkpoint name or folder of task ``image_prior``; the first installed one by default.
    steps : int
        DDIM steps (20 in the recipe).
    eta : float
        0 = deterministic DDIM, 1 = ancestral.
    options : RunOptions
        Device, seed, batch size, progress, cancel.

    Returns
    -------
    ndarray, shape (count, H, W), float32 in [0, 1]
    """
    options = options or RunOptions()
    if count < 1:
        raise TaskInputError(f"count must be at least 1, got {count}")
    checkpoint = load_model(model, task="image_prior")
    predictor = NoisePredictor(checkpoint.network, device=options.device, precision=options.precision,
                               schedule=checkpoint.schedule)
    size = int((checkpoint.card.get("patch_size") or [128])[0])
    runner = SliceRunner.for_predictor(predictor, options)

    def sample(index, noise, span):
        # each image from its own noise stream: the same seed gives the same images at any batch size
        x_T = randn((len(index), 1, size, size), noise, runner.device, runner.sample_dtype)
        x0 = ddim_sample(predictor, x_T, checkpoint.schedule, steps=steps, eta=eta, generator=noise,
                         progress=span, cancel=options.cancel)
        return ((runner.numpy(x0) + 1.0) / 2.0).clip(0, 1)

    return runner.run(range(count), sample, cost=steps, message="sampling").astype(np.float32)


def add_command(subparsers) -> None:
    from .cli import add_common_options, cli_progress, options_from_args

    p = subparsers.add_parser("sample-images", help="generate 2D images from an image prior (PNG files)")
    p.add_argument("-o", "--output", required=True, help="new folder for sample_000.png, ...")
    p.add_argument("--count", type=int, default=8)
    add_common_options(p, steps=20)

    def run(args) -> int:
        from pathlib import Path

        from skimage import io as skio

        from .. import io

        out = Path(args.output)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise io.WriteError(f"{out}: folder exists and is not empty (nothing was written)")
        images = sample_images(args.count, model=args.model, steps=args.steps,
                               options=options_from_args(args, progress=cli_progress(args.verbose)))
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            skio.imsave(str(out / f"sample_{i:03d}.png"), (image * 255).round().astype(np.uint8),
                        check_contrast=False)
        print(f"wrote {len(images)} images to {out}")
        return 0

    p.set_defaults(func=run)
