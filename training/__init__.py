"""Training code for every napari-mediffuse checkpoint (run from a clone).

    python -m training train --config training/configs/ct_prior.yaml --output runs/ct-prior-demo
    torchrun --nproc_per_node N -m training train --config ... --output ...
    python -m training export runs/ct-prior-demo --output DIR [--fp16]

Networks come from :mod:`napari_mediffuse.engine` (each defined once).
"""
