"""The task tabs of the mediffuse panel: one :class:`TaskSpec` per task.

Each spec binds a plain task function of :mod:`napari_mediffuse.tasks` to
its parameters; nothing here computes anything. ``run`` functions execute in
a worker thread and return napari layer data tuples.
"""
from __future__ import annotations

from ..engine.networks import REGIONS
from ..layers import image_layer_data
from .task_tab import INPUT_MODALITY, LABELS_LAYER, Param, TaskSpec, zero_is_auto

def default(function, name: str):
    """A task function's default for ``name``: the tab starts from the same
    defaults as the Python API and the CLI."""
    import inspect

    return inspect.signature(function).parameters[name].default


def body_region(values: dict):
    """The body region a tab's values name (its empty choice: not said)."""
    return values.get("region") or None


SEED = Param("seed", 0, tooltip="Random seed: the same seed gives the same result", advanced=True)
BATCH = Param("batch_size", 0, label="batch size", options={"min": 0, "max": 64}, advanced=True,
              tooltip="Slices processed together; 0 = automatic (32 on a CUDA GPU, halved while it runs "
                      "out of memory; 4 elsewhere and for synthesis and Stable-Diffusion translation). "
                      "The result does not depend on it")
#: The scan's body region for the CT tasks (the CLI's --region); empty = not said.
BODY_REGION = Param("region", "", label="body region", options={"choices": ["", "head-neck", "chest", "abdomen"]},
                    advanced=True,
                    tooltip="The scan's body region: the class a region-conditioned model is given and the "
                            "region checked against what a model saw (super-resolution 'auto' picks by it); "
                            "empty = the model's default class, and the check judges the region from DICOM "
                            "BodyPartExamined or the scan")


def diffpir_lambda(task_function) -> Param:
    """The DiffPIR data-fidelity weight, starting from ``task_function``'s default."""
    return Param("lam", default(task_function, "lam"), label="lambda", options={"min": 0.0, "max": 100.0},
                 tooltip="DiffPIR data-fidelity weight (rho_t = lambda sigma_n^2 / sigma_t^2)", advanced=True)


def noise_level(tooltip: str) -> Param:
    """The input's noise std in HU (0 = estimated from the image)."""
    return Param("noise_hu", 0.0, label="noise (HU)", options={"min": 0.0, "max": 500.0, "step": 1.0},
                 tooltip=tooltip, advanced=True)


def _synthetic_name(kwargs: dict) -> dict:
    kwargs["name"] = kwargs["name"] if "synthetic" in kwargs["name"] else f"{kwargs['name']} [synthetic]"
    return kwargs


# -- synthesis -------------------------------------------------------------------

def _changed(value, default):
    """``value`` if the user moved the spin box off ``default``, else None
    (the task then picks its default for the path it takes)."""
    return None if abs(value - default) < 1e-9 else value


def _run_synthesis(volume, values, options):
    from ..tasks.synthesize import DEFAULT_SLICE_CORRELATION, synthesize

    spacing = zero_is_auto(values["spacing_mm"])
    result = synthesize((values["slices"], values["rows"], values["columns"]),
                        spacing=None if spacing is None else (spacing,) * 3, region=values["region"],
                        model=values["model"], steps=values["steps"],
                        coarse_model="auto" if values["coarse_layout"] else None,
                        detail_model="auto" if values["detail_stage"] else None,
                        refine_from=zero_is_auto(values["refine_from"]),
                        slice_correlation=_changed(values["slice_correlation"], DEFAULT_SLICE_CORRELATION),
                        options=options)
    data, kwargs, kind = image_layer_data(result)
    return [(data, _synthetic_name(kwargs), kind)]


def synthesis_spec() -> TaskSpec:
    from ..tasks.synthesize import DEFAULT_SLICE_CORRELATION

    return TaskSpec(
        key="synthesize", title="Synthesis", run=_run_synthesis, needs_input=False, preview=False,
        description="Generate a 3D-coherent synthetic CT volume (HU) from the CT prior.",
        params=[
            Param("slices", 64, options={"min": 16, "max": 1024}, tooltip="Voxels along superior-inferior"),
            Param("rows", 101, options={"min": 16, "max": 1024}, tooltip="Voxels along anterior-posterior"),
            Param("columns", 122, options={"min": 16, "max": 1024}, tooltip="Voxels along right-left"),
            Param("spacing_mm", 0.0, label="spacing (mm)", options={"min": 0.0, "max": 10.0, "step": 0.25},
                  tooltip="Isotropic voxel spacing; 0 = the model's own (3 mm for a prior trained at several pixel sizes)"),
            Param("region", "abdomen", options={"choices": list(REGIONS)}, tooltip="Body region to synthesise"),
            Param("steps", 50, options={"min": 1, "max": 1000}, tooltip="DDIM steps over the whole volume"),
            Param("coarse_layout", True, label="coarse layout first",
                  tooltip="Draw the body's layout with the coarse whole-body prior (if installed), "
                          "then refine it with the 2D prior"),
            Param("detail_stage", True, label="detail stage",
                  tooltip="Draw the layout's detail (bones, airway, fat planes) slice by slice with the detail "
                          "model, if one is installed for the region"),
            Param("refine_from", 0, label="refine from step", options={"min": 0, "max": 999}, advanced=True,
                  tooltip="Step (of 1000) at which the 2D prior takes over from the coarse layout; "
                          "higher redraws more; 0 = the default (750; 400 after a detail stage, whose draw is the "
                          "result on its own 4 mm grid)"),
            Param("slice_correlation", DEFAULT_SLICE_CORRELATION, label="slice noise correlation",
                  options={"min": 0.0, "max": 0.99, "step": 0.01}, advanced=True,
                  tooltip="Correlation of the noise between neighbouring axial slices: higher gives smoother "
                          "transitions between slices, 0 independent slices. Left at its default, a coarse "
                          "layout is refined with it and a draw from noise uses independent slices"),
            SEED, BATCH,
        ])


# -- 2D image prior ----------------------------------------------------------------

def _run_sample_images(volume, values, options):
    from ..tasks.sample_images import sample_images

    images = sample_images(values["count"], model=values["model"], steps=values["steps"], options=options)
    kwargs = {"name": f"samples (seed {options.seed}) [synthetic]", "colormap": "gray",
              "contrast_limits": (0.0, 1.0), "metadata": {"synthetic": True, "task": "sample_images",
                                                           "model": values["model"]}}
    return [(images, kwargs, "image")]


def image_prior_spec() -> TaskSpec:
    return TaskSpec(
        key="sample_images", title="2D samples", run=_run_sample_images, needs_input=False, preview=False,
        model_task="image_prior", model_modality=None,
        description="Sample a stack of 2D images from a 128x128 image prior (DDIM).",
        params=[Param("count", 8, options={"min": 1, "max": 256}, tooltip="Number of images"),
                Param("steps", 20, options={"min": 1, "max": 1000}, tooltip="DDIM steps (20 in the recipe)"),
                SEED, BATCH])


# -- denoising and super-resolution ------------------------------------------------

def _run_denoise(volume, values, options):
    from ..tasks.denoise import denoise

    result = denoise(volume, method=values["method"], model=values["model"], steps=values["steps"] or None,
                     strength=values["strength"], noise_hu=zero_is_auto(values["noise_hu"]),
                     lam=values["lam"], ensemble=values["ensemble"] if values["method"] == "learned" else 1,
                     region=body_region(values), options=options)
    return [image_layer_data(result)]


def denoise_spec() -> TaskSpec:
    from ..tasks.denoise import denoise

    return TaskSpec(
        key="denoise", title="Denoise", run=_run_denoise, model_task=("ct_prior", "denoising"),
        description="Low-dose CT denoising: DiffPIR with a CT prior, a learned denoiser (denoising model), "
                    "or BM3D / non-local means.",
        params=[
            Param("method", "diffusion", options={"choices": ["diffusion", "learned", "bm3d", "nlm"]},
                  tooltip="diffusion = DiffPIR with a CT prior; learned = a denoising model; "
                          "bm3d / nlm = classical baselines"),
            Param("strength", 1.0, options={"min": 0.1, "max": 3.0, "step": 0.1},
                  tooltip="Scales the estimated noise level: higher removes more noise (and detail)"),
            Param("steps", 0, options={"min": 0, "max": 200},
                  tooltip="Network evaluations per slice; 0 = the method's default (diffusion 2, learned 1 = "
                          "the model's posterior mean)"),
            noise_level("Noise standard deviation in HU; 0 = estimate it from the image"),
            diffpir_lambda(denoise),
            Param("ensemble", default(denoise, "ensemble"), label="estimates averaged",
                  options={"min": 1, "max": 16}, advanced=True,
                  tooltip="Learned only: average this many estimates per slice (own noise draws, mirrored "
                          "views); each costs one more network run"),
            BODY_REGION, SEED, BATCH,
        ])


def _run_sr(volume, values, options):
    from ..tasks.superres import super_resolve

    result = super_resolve(volume, factor=values["factor"], method=values["method"], model=values["model"],
                           steps=values["steps"] or None, strength=values["strength"], planes=values["planes"],
                           lam=values["lam"], eta=values["eta"], end_hu=values["end_hu"],
                           noise_hu=zero_is_auto(values["noise_hu"]),
                           ensemble=values["ensemble"] if values["method"] in ("auto", "learned") else 1,
                           region=body_region(values), options=options)
    return [image_layer_data(result)]


def sr_spec() -> TaskSpec:
    from ..tasks.superres import super_resolve

    return TaskSpec(
        key="sr", title="Super-resolution", run=_run_sr, preview=False,
        model_task=("ct_prior", "super_resolution"),
        description="Thick -> thin slices: factor thin slices per thick slice (e.g. 5 mm -> 1 mm is 5). "
                    "Method diffusion runs a CT prior, learned a super_resolution model.",
        params=[
            Param("factor", 2, options={"min": 2, "max": 8}, tooltip="Thin slices per thick slice"),
            Param("method", default(super_resolve, "method"),
                  options={"choices": ["auto", "diffusion", "learned", "cubic", "sinc"]},
                  tooltip="auto = learned where a super_resolution model is installed and the scan is inside "
                          "what it saw, else diffusion; diffusion = DiffPIR with a CT prior on coronal/sagittal "
                          "planes; learned = a super_resolution model on the same planes; cubic / windowed "
                          "sinc = interpolation"),
            Param("steps", 0, options={"min": 0, "max": 200},
                  tooltip="Network evaluations per plane; 0 = the method's default (diffusion 4, "
                          "learned 1 = the model's posterior mean)"),
            Param("strength", default(super_resolve, "strength"), options={"min": 0.0, "max": 3.0, "step": 0.1},
                  tooltip="Start noise of the diffusion (1 = default; 0 = interpolation made consistent "
                          "with the thick slices)"),
            Param("planes", default(super_resolve, "planes"),
                  options={"choices": ["both", "coronal", "sagittal"]}, advanced=True,
                  tooltip="Planes the prior works on (the slice axis lies in both); both = average, 2x time"),
            diffpir_lambda(super_resolve),
            Param("eta", default(super_resolve, "eta"), options={"min": 0.0, "max": 1.0, "step": 0.05},
                  tooltip="0 = deterministic DDIM; up to 1 = fresh noise at each step", advanced=True),
            Param("end_hu", default(super_resolve, "end_hu"), label="stop at noise (HU)",
                  options={"min": 0.0, "max": 200.0, "step": 1.0}, advanced=True,
                  tooltip="Stop at this noise level and return the posterior mean (larger = smoother)"),
            noise_level("Noise std of the thick slices; 0 = estimate it from the image"),
            Param("ensemble", default(super_resolve, "ensemble"), label="estimates averaged",
                  options={"min": 1, "max": 16}, advanced=True,
                  tooltip="Learned only: average this many estimates per plane (own noise draws, every other "
                          "one mirrored left-right); each costs one more network run"),
            BODY_REGION, SEED, BATCH,
        ])


# -- anomaly and inpainting ------------------------------------------------------

def _run_anomaly(volume, values, options):
    from ..tasks.anomaly import anomaly_layers, detect_anomalies

    result = detect_anomalies(volume, roi=values["roi"], t=values["t"], ensemble=values["ensemble"],
                              steps=values["steps"], threshold=zero_is_auto(values["threshold"]),
                              percentile=values["percentile"], model=values["model"],
                              pixel_mm=zero_is_auto(values["pixel_mm"]), polarity=values["polarity"],
                              match_level=values["match_level"], smooth_mm=values["smooth_mm"],
                              method=values["method"], region=body_region(values), options=options)
    return anomaly_layers(result, reconstruction=values["show_reconstruction"])


def anomaly_spec() -> TaskSpec:
    from ..tasks.anomaly import METHODS, POLARITIES
    from ..tasks.anomaly import detect_anomalies as detect

    return TaskSpec(
        key="anomaly", title="Anomaly", run=_run_anomaly,
        model_task=("ct_prior", "lesion_healing", "lesion_segmentation"),
        description="Where does the scan depart from healthy anatomy? Heatmap and mask from a healthy "
                    "version of the scan (the prior's reconstruction by partial diffusion), or a learned "
                    "lesion segmenter's probability.",
        params=[
            Param("method", default(detect, "method"), options={"choices": list(METHODS)},
                  tooltip="diffusion = partial diffusion with a CT prior; learned = a lesion segmenter (or a "
                          "lesion-healing model) trained on synthetic lesions (choose one as the model; t, "
                          "steps and pixel size do not apply)"),
            Param("roi", None, label="region", annotation=LABELS_LAYER,
                  options={"none_label": "(body, automatic)"},
                  tooltip="Labels layer restricting the analysis (nonzero = inside); default: the body"),
            Param("t", default(detect, "t"), options={"min": 1, "max": 999},
                  tooltip="Noise step (of 1000): higher wipes out larger anomalies"),
            Param("ensemble", default(detect, "ensemble"), options={"min": 1, "max": 16},
                  tooltip="Noise seeds averaged (less variance, more time)"),
            Param("threshold", 0.0, options={"min": 0.0, "max": 100.0, "step": 0.1},
                  tooltip="Heatmap value that makes the mask; 0 = automatic (percentile; a lesion "
                          "segmenter: probability 0.5, and a threshold must be below 1)"),
            Param("polarity", default(detect, "polarity"), options={"choices": list(POLARITIES)},
                  tooltip="Departures that count: both, or only where the scan is darker (hypodense lesions, "
                          "e.g. liver metastases) / brighter than the healthy reconstruction"),
            Param("match_level", default(detect, "match_level"), label="match organ level",
                  tooltip="Shift the reconstruction per slice to the scan's median inside the region "
                          "(an organ enhanced unlike the prior's training scans)"),
            Param("show_reconstruction", False, label="add healthy reconstruction",
                  tooltip="Also add the healthy version as a hidden layer (not from a lesion segmenter, which "
                          "makes none)"),
            Param("steps", default(detect, "steps"), options={"min": 1, "max": 200}, advanced=True,
                  tooltip="DDIM steps from t to 0"),
            Param("smooth_mm", default(detect, "smooth_mm"), label="heatmap smoothing (mm)",
                  options={"min": 0.0, "max": 20.0, "step": 0.5}, advanced=True,
                  tooltip="Gaussian sigma of the heatmap in the slice plane, about half the lesion size you look "
                          "for: 6 mm scored best for 10-30 mm soft-tissue lesions, the default for lung "
                          "tumours and liver tumours (docs/evaluation/anomaly_real.md)"),
            Param("percentile", default(detect, "percentile"), options={"min": 50.0, "max": 99.99}, advanced=True,
                  tooltip="Automatic threshold: this percentile of the heatmap inside the region"),
            Param("pixel_mm", 0.0, label="pixel size (mm)", options={"min": 0.0, "max": 10.0, "step": 0.25},
                  advanced=True,
                  tooltip="In-plane pixel size the prior reconstructs at (within the sizes it was trained "
                          "at); 0 = the prior's own (a multi-resolution prior: the scan's)"),
            BODY_REGION, SEED, BATCH,
        ])


def _run_inpaint(volume, values, options):
    from ..tasks.inpaint import inpaint

    if values["mask"] is None:
        raise ValueError("paint the region to replace in a Labels layer and choose it as mask")
    result = inpaint(volume, values["mask"], steps=values["steps"], resample=values["resample"],
                     model=values["model"], region=body_region(values), options=options)
    return [image_layer_data(result)]


def inpaint_spec() -> TaskSpec:
    from ..tasks.inpaint import inpaint

    return TaskSpec(
        key="inpaint", title="Inpaint", run=_run_inpaint,
        description="Replace a painted region with tissue consistent with its surroundings (RePaint): "
                    "'what would this look like healthy'.",
        params=[
            Param("mask", None, annotation=LABELS_LAYER, options={"none_label": "(choose a Labels layer)"},
                  tooltip="Labels layer on the CT's grid; nonzero voxels are replaced"),
            Param("steps", default(inpaint, "steps"), options={"min": 1, "max": 500}, tooltip="DDIM steps"),
            Param("resample", default(inpaint, "resample"), options={"min": 0, "max": 5}, advanced=True,
                  tooltip="RePaint resampling rounds per step (better harmony, more time)"),
            BODY_REGION, SEED, BATCH,
        ])


# -- translation -------------------------------------------------------------------

def _run_translate(volume, values, options):
    from ..tasks.translate import translate

    direction = values.get("direction") or "auto"
    if direction == "auto":
        direction = "ct2mr" if volume.modality == "CT" else "mr2ct"
    folder = values.get("diffusers_folder")
    pipeline = bool(folder) and str(folder) not in ("", ".")
    model = str(folder) if pipeline else values.get("model")
    result = translate(volume, direction=direction, model=model, steps=values.get("steps"),
                       guidance=values.get("guidance"), sampler=values.get("sampler", "ddim"),
                       ensemble=None if pipeline else values.get("ensemble"),
                       prompt=values.get("prompt") or None, image_guidance=values.get("image_guidance"),
                       region=body_region(values), force=bool(values.get("force")),
                       options=options)
    return [image_layer_data(result)]  # marked synthetic by the task (name, metadata)


def translate_spec() -> TaskSpec:
    from pathlib import Path

    from ..tasks.translate import DEFAULT_ENSEMBLE, DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS

    return TaskSpec(
        key="translate", title="Translate", run=_run_translate, modalities=("CT", "MR"),
        model_task="translation", model_modality=INPUT_MODALITY, preview=True,
        description="CT -> MR-like image or MR -> synthetic CT, on the input's grid. "
                    "The result is SYNTHETIC: never use it for diagnosis.",
        params=[
            Param("direction", "auto", tooltip="auto: CT input -> MR, MR input -> CT",
                  options={"choices": ["auto", "ct2mr", "mr2ct"]}),
            Param("steps", DEFAULT_STEPS, tooltip="sampler steps per slice", options={"min": 1, "max": 200}),
            Param("guidance", DEFAULT_GUIDANCE,
                  tooltip="image guidance scale (1 = plain model; >1 follows the source more, 2x slower); "
                          "text guidance for Stable Diffusion pipelines",
                  options={"min": 0.0, "max": 20.0, "step": 0.1}),
            Param("ensemble", DEFAULT_ENSEMBLE, options={"min": 1, "max": 16},
                  tooltip="samples averaged per slice (1 = one sample, half the time); our models only"),
            Param("region", "", options={"choices": ["", "head-neck", "chest", "abdomen"]},
                  tooltip="the scan's body region (empty: DICOM BodyPartExamined, else judged from the scan); "
                          "a region the model never saw is refused unless Force"),
            Param("force", False, tooltip="run even on a body region the model never saw "
                                          "(the result is marked as outside the model's domain)"),
            Param("sampler", "ddim", options={"choices": list(SAMPLERS)}, advanced=True),
            Param("diffusers_folder", Path(""), annotation=Path, advanced=True,
                  tooltip="a Stable Diffusion InstructPix2Pix / ControlNet pipeline folder "
                          "(overrides the model above)", options={"mode": "d"}),
            Param("prompt", "", tooltip="Stable Diffusion pipelines only (default: Mediffuse's)", advanced=True),
            Param("image_guidance", 1.5, tooltip="InstructPix2Pix image guidance scale", advanced=True,
                  options={"min": 0.0, "max": 20.0, "step": 0.1}),
            SEED, BATCH,
        ])


def task_specs() -> list[TaskSpec]:
    """Specs of every task tab, in panel order."""
    return [denoise_spec(), sr_spec(), anomaly_spec(), inpaint_spec(), translate_spec(), synthesis_spec(),
            image_prior_spec()]
