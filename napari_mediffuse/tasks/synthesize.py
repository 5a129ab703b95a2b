"""Volume synthesis from the 2D CT prior, 3D-coherent by alternating planes.

A 2D prior samples slices independently, so stacking 2D samples gives a
volume whose neighbouring slices do not match. Here the whole volume is one
sample of the reverse diffusion: at every step the noise of the *volume* is
estimated slice by slice along one plane, and the plane alternates
(axial, coronal, sagittal, axial, ...). The demo prior was trained on all
three orientations, so each plane's estimate is in-distribution, and
alternating them couples every voxel to its neighbours in all three
directions (the idea of TPDM / DiffusionBlend-style "2D priors for 3D").
Whole slices are evaluated in one pass (the network is fully convolutional
and gets each pixel's coordinates); with ``RunOptions.window`` the predictor
uses overlapping sliding windows with blended noise estimates instead, so
any size works.

The images are generated at the checkpoint's native pixel spacing and
resampled to the requested spacing when it differs.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.control import ProgressSpan, check_cancel
from ..engine.intensity import denormalize, intensity_range
from ..engine.sampling import ddim_sample, make_generator, randn
from ..io.volume import Volume, affine_from_world
from .common import RunOptions, TaskInputError, load_prior

PLANES = ("axial", "coronal", "sagittal")


def plane_stack(volume: torch.Tensor, plane: str) -> torch.Tensor:
    """(S, P, L) tensor -> (N, 1, H, W) slices shown as in training.

    Axial slices are (P, L); coronal (S, L) and sagittal (S, P) slices have
    superior at the top (row 0), as ``training.data.take_slice`` makes them.
    """
    if plane == "axial":
        stack = volume
    elif plane == "coronal":
        stack = volume.permute(1, 0, 2).flip(1)
    elif plane == "sagittal":
        stack = volume.permute(2, 0, 1).flip(1)
    else:
        raise ValueError(f"unknown plane {plane!r}; choose from {PLANES}")
    return stack.unsqueeze(1)


def volume_from_stack(stack: torch.Tensor, plane: str) -> torch.Tensor:
    """Inverse of :func:`plane_stack`."""
    stack = stack[:, 0]
    if plane == "axial":
        return stack
    if plane == "coronal":
        return stack.flip(1).permute(1, 0, 2)
    return stack.flip(1).permute(1, 2, 0)


def alternating_plane_predictor(predictor, planes=PLANES, *, batch_size: int = 4, region=None, cancel=None):
    """Noise predictor for a whole (1, 1, S, P, L) volume, one plane per call.

    Calls alternate through ``planes``; each call runs ``predictor`` on the
    volume's slices of the current plane in batches.
    """
    state = {"call": 0}

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        plane = planes[state["call"] % len(planes)]
        state["call"] += 1
        stack = plane_stack(x[0, 0], plane)
        eps = torch.empty_like(stack)
        for start in range(0, stack.shape[0], batch_size):
            check_cancel(cancel)
            chunk = stack[start:start + batch_size]
            eps[start:start + batch_size] = predictor(chunk, t, region=region).to(eps.dtype)
        return volume_from_stack(eps, plane)[None, None]

    return predict


def synthesis_affine(shape, spacing) -> np.ndarray:
    """Display-orientation (S, P, L) affine whose volume centre is the RAS origin."""
    affine = affine_from_world(spacing, (0.0, 0.0, 0.0))
    centre = (np.asarray(shape, dtype=float) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def synthesize(shape, *, spacing=None, region: str = "abdomen", model=None, steps: int = 50,
               planes=PLANES, eta: float = 0.0, options: RunOptions | None = None) -> Volume:
    """Generate a CT volume (HU) from the CT prior.

    Parameters
    ----------
    shape : (int, int, int)
        Output voxels along (S, P, L): slices, rows, columns.
    spacing : (float, float, float), optional
        Output voxel spacing in mm; the checkpoint's native pixel spacing
        (isotropic) by default.
    region : str
        Body region the sample should show (``'abdomen'``, ``'chest'``,
        ``'head-neck'`` or ``'unknown'``), if the checkpoint is
        region-conditioned.
    model : str, optional
        Checkpoint name or folder; the default CT prior otherwise.
    steps : int
        DDIM steps (network evaluations over the whole volume).
    planes : sequence of str
        Planes alternated at successive steps (3D coherence).
    eta : float
        0 = deterministic DDIM from the seeded noise; 1 = ancestral.
    options : RunOptions
        Device, seed, batch size, progress and cancel.

    Returns
    -------
    Volume
        HU values, marked synthetic, with an affine centred on the origin.
    """
    options = options or RunOptions()
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise TaskInputError(f"synthesis needs a 3D shape (slices, rows, columns), got {shape}")
    checkpoint, predictor = load_prior(model, options)
    card = checkpoint.card
    native = float((card.get("pixel_spacing_mm") or [1.0])[0])
    patch = int((card.get("patch_size") or [1])[0])
    spacing = (native,) * 3 if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise TaskInputError(f"spacing must be three positive numbers in mm, got {spacing}")
    regions = card.get("regions") or []
    if region not in regions:
        raise TaskInputError(f"checkpoint {checkpoint.name!r} knows the regions {regions}; got {region!r}")
    # generate at the prior's native spacing, then resample
    native_shape = tuple(max(1, int(round(n * s / native))) for n, s in zip(shape, spacing))
    if min(native_shape) < patch:
        raise TaskInputError(
            f"shape {shape} at {spacing} mm is {native_shape} voxels at the model's {native:g} mm; "
            f"every side must be at least the model's patch size ({patch} voxels = {patch * native:g} mm)")

    started = time.monotonic()
    gen = make_generator(options.seed)
    x_T = randn((1, 1) + native_shape, gen, predictor.device)
    predict = alternating_plane_predictor(predictor, tuple(planes), batch_size=options.batch_size,
                                          region=regions.index(region), cancel=options.cancel)
    x0 = ddim_sample(predict, x_T, checkpoint.schedule, steps=steps, eta=eta, generator=gen,
                     progress=ProgressSpan(options.progress, 0, steps, "synthesis"), cancel=options.cancel)
    if native_shape != shape:
        x0 = F.interpolate(x0, size=shape, mode="trilinear", align_corners=True)
    hu = denormalize(x0[0, 0].float().cpu().numpy(), intensity_range(None, checkpoint.normalization))
    params = {"shape": list(shape), "spacing_mm": list(spacing), "region": region, "steps": steps,
              "planes": list(planes), "seed": options.seed, "seconds": round(time.monotonic() - started, 1)}
    return Volume(
        data=hu.astype(np.float32), affine=synthesis_affine(shape, spacing), modality="CT",
        name=f"synthetic CT ({region}, seed {options.seed})", source="",
        metadata={"task": "synthesize", "synthetic": True, "parameters": params,
                  "model": checkpoint.name, "warnings": []},
    )


def add_command(subparsers) -> None:
    from .cli import add_common_options, check_output_free, cli_progress, options_from_args

    p = subparsers.add_parser("synthesize", help="generate a 3D-coherent synthetic CT volume (HU)")
    p.add_argument("-o", "--output", required=True, help="output NIfTI file")
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"),
                   help="voxels along superior, posterior, left")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                   help="voxel spacing in mm (default: the model's native spacing)")
    p.add_argument("--region", default="abdomen", help="body region (abdomen, chest, head-neck, unknown)")
    add_common_options(p, steps=50)

    def run(args) -> int:
        from .. import io

        check_output_free(args.output, args.overwrite)
        options = options_from_args(args, progress=cli_progress(args.verbose))
        volume = synthesize(args.shape, spacing=args.spacing, region=args.region, model=args.model,
                            steps=args.steps, options=options)
        io.write_nifti(volume, args.output, overwrite=args.overwrite)
        print(f"wrote {args.output}")
        return 0

    p.set_defaults(func=run)
