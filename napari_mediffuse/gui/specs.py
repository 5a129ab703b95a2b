"""The task tabs of the mediffuse panel: one :class:`TaskSpec` per task.

Each spec binds a plain task function of :mod:`napari_mediffuse.tasks` to
its parameters; nothing here computes anything. ``run`` functions execute in
a worker thread and return napari layer data tuples.
"""
from __future__ import annotations

from ..engine.networks import REGIONS
from ..layers import image_layer_data
from .task_tab import Param, TaskSpec

SEED = Param("seed", 0, tooltip="Random seed: the same seed gives the same result", advanced=True)
BATCH = Param("batch_size", 4, label="batch size", options={"min": 1, "max": 64}, advanced=True,
              tooltip="Slices processed together (larger keeps a GPU busy)")


def _synthetic_name(kwargs: dict) -> dict:
    kwargs["name"] = kwargs["name"] if "synthetic" in kwargs["name"] else f"{kwargs['name']} [synthetic]"
    return kwargs


# -- synthesis -------------------------------------------------------------------

def _run_synthesis(volume, values, options):
    from ..tasks.synthesize import synthesize

    spacing = values["spacing_mm"]
    result = synthesize((values["slices"], values["rows"], values["columns"]),
                        spacing=None if spacing <= 0 else (spacing,) * 3, region=values["region"],
                        model=values["model"], steps=values["steps"], options=options)
    data, kwargs, kind = image_layer_data(result)
    return [(data, _synthetic_name(kwargs), kind)]


def synthesis_spec() -> TaskSpec:
    return TaskSpec(
        key="synthesize", title="Synthesis", run=_run_synthesis, needs_input=False, preview=False,
        description="Generate a 3D-coherent synthetic CT volume (HU) from the CT prior.",
        params=[
            Param("slices", 64, options={"min": 16, "max": 1024}, tooltip="Voxels along superior-inferior"),
            Param("rows", 101, options={"min": 16, "max": 1024}, tooltip="Voxels along anterior-posterior"),
            Param("columns", 122, options={"min": 16, "max": 1024}, tooltip="Voxels along right-left"),
            Param("spacing_mm", 0.0, label="spacing (mm)", options={"min": 0.0, "max": 10.0, "step": 0.25},
                  tooltip="Isotropic voxel spacing; 0 = the model's native spacing"),
            Param("region", "abdomen", options={"choices": list(REGIONS)}, tooltip="Body region to synthesise"),
            Param("steps", 50, options={"min": 1, "max": 1000}, tooltip="DDIM steps over the whole volume"),
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


def task_specs() -> list[TaskSpec]:
    """Specs of every task tab, in panel order."""
    return [synthesis_spec(), image_prior_spec()]
