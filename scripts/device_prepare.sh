#!/usr/bin/env bash
# Before a call to a lent GPU machine (the `device` tool): make the working tree fit what
# travels (64 MiB; the tracked tree is about 94 MiB, 74 of them bundled weights) and fetch the
# Python packages that machine's image lacks, as wheels for its Python 3.12. Afterwards,
# `bash scripts/device_prepare.sh restore` puts every moved file back (or `git checkout -- .`).
#
#   bash scripts/device_prepare.sh [CONFIG]   # moves files to $STASH, downloads wheels into .whl/,
#                                             # cuts the benchmark's chest slab (and packs CONFIG) into .gpu/
#   (device run: command "bash scripts/device_check.sh [520 CONFIG .gpu/pack.npz]",
#    carry [".whl", ".gpu"], timeout_s 590)
#   bash scripts/device_prepare.sh restore
#
# What stays: the code, tests and the models the gpu tests and the task benchmark load
# (ct-prior-multi, ct-prior-coarse-multi, ct2mr-multi, brain-mr-128-demo).
# What moves: docs/, the bundled models no gpu test loads (synthesis of an abdomen takes
# ct-prior-coarse-multi when ct-prior-coarse-demo is away) and training/checkpoints but the
# config's train.init_from. Session 20: 57 MiB with a pack.
#
# DEVICE_TRAIN_ONLY=1 (for a call that only trains, DEVICE_TRAIN_ONLY=1 on device_check.sh too):
# every bundled model moves except the config's train.init_from, and the pack keeps every
# PACK_SLICE_STEP-th axial slice (default 4) where the data kind trains on single axial slices
# (training.pack.AXIAL_KINDS), so a native-resolution dataset fits.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=${MEDIFFUSE_DEVICE_STASH:-/tmp/mediffuse-device-stash}
MODELS="ct-prior-demo mr2ct-multi ct-denoise-multi ct-sr-multi ct-prior-coarse-demo ct-lesion-seg-multi"
# the image has torch, numpy, scipy, scikit-image, safetensors, einops, pyyaml, pillow, pytest
# and huggingface-hub 1.33 (which diffusers 0.42 accepts: >= 1.32) (the device tool's KINDS.md);
# the versions here are this project's tested ones
# (not BM3D: the benchmark there leaves out its CPU-only baseline, and no gpu test runs it)
WHEELS="diffusers==0.42.1 monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 platformdirs==4.14.9"

if [ "${1:-}" = "restore" ]; then
    [ -d "$STASH" ] || { echo "nothing stashed in $STASH"; exit 0; }
    # never overwrite: a file that is here again (e.g. after git checkout) and differs from its
    # stashed copy stays as it is, and the copy stays in $STASH; an identical copy is dropped
    kept=0
    while read -r f; do
        mkdir -p "$(dirname "$f")"
        if [ ! -e "$f" ]; then mv "$STASH/$f" "$f"
        elif cmp -s "$STASH/$f" "$f"; then rm "$STASH/$f"
        else echo "kept $f (it differs from the stashed copy, which stays in $STASH)"; kept=1; fi
    done < <(cd "$STASH" && find . -type f)
    if [ "$kept" -eq 0 ]; then rm -rf "$STASH"; fi
    git status --short | head
    echo "restored; git status above should show no deleted files"
    exit 0
fi

mkdir -p "$STASH"
trap 'echo "stopped: bash scripts/device_prepare.sh restore puts the moved files back"' ERR
move() { for f in "$@"; do [ -e "$f" ] || continue; mkdir -p "$STASH/$(dirname "$f")"; mv "$f" "$STASH/$f"; done; }
move $(git ls-files docs)
if [ "${DEVICE_TRAIN_ONLY:-0}" = 1 ]; then
    [ -n "${1:-}" ] || { echo "DEVICE_TRAIN_ONLY=1 needs a CONFIG"; exit 2; }
    # every bundled model but the one train.init_from names (a folder, or a bundled model's name)
    keep=$(python3 -c "import sys; from pathlib import Path; from training.trainer import load_config; \
i = load_config(sys.argv[1])['train'].get('init_from') or ''; \
print(Path(i).resolve().name if Path(i).is_dir() else i)" "$1")
    MODELS=$(ls napari_mediffuse/data/models | while read -r m; do [ "$m" = "$keep" ] || echo "$m"; done)
fi
for m in $MODELS; do move $(git ls-files "napari_mediffuse/data/models/$m"); done
# weights kept to fine-tune from (training/checkpoints, 28 MiB, not bundled) travel only when the
# config starts from one of them
init_from=""
if [ -n "${1:-}" ]; then
    init_from=$(python3 -c "import sys; from training.trainer import load_config; \
print(load_config(sys.argv[1])['train'].get('init_from') or '')" "$1")
fi
for d in training/checkpoints/*/; do
    [ -d "$d" ] || continue  # no folder matched: the pattern itself
    d=${d%/}
    if [ -n "$init_from" ] && [ "$(realpath -m "$d")" = "$(realpath -m "$init_from")" ]; then continue; fi
    move $(find "$d" -type f)  # tracked or not: all of it would travel
done

mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir .gpu
# the task benchmark's CT there: 24 slices of the 1 mm chest CT (6 MiB), as the benchmark reads here
chest=${MEDIFFUSE_SHARED_DATA:-../shared/data}/ct/chest_ct_lidc0314_1mm.nii.gz
if [ -f "$chest" ] && [ "${DEVICE_TRAIN_ONLY:-0}" != 1 ]; then
    python3 -c "import nibabel as nib, sys; nib.save(nib.load(sys.argv[1]).slicer[:, :, 100:124], sys.argv[2])" \
        "$chest" .gpu/chest_slab.nii.gz
fi
# a training config's volumes, loaded here, for a run there (the data does not travel)
pack_args=()
if [ "${DEVICE_TRAIN_ONLY:-0}" = 1 ]; then  # every 4th axial slice where the data kind allows it
    axial=$(python3 -c "import sys; from training.pack import AXIAL_KINDS; from training.trainer import load_config; \
print(int(load_config(sys.argv[1])['data'].get('kind') in AXIAL_KINDS))" "$1")
    [ "$axial" = 1 ] && pack_args=(--slice-step "${PACK_SLICE_STEP:-4}")
fi
if [ -n "${1:-}" ]; then python3 -m training pack --config "$1" --output .gpu/pack.npz "${pack_args[@]}"; fi
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
tree=$( (git ls-files; git ls-files --others --exclude-standard) | while read -r f; do if [ -f "$f" ]; then echo "$f"; fi; done \
        | tr '\n' '\0' | xargs -0 du -cb | tail -1 | cut -f1)
wheels=$(du -cb .whl .gpu | tail -1 | cut -f1)
echo "working tree $((tree / 1048576)) MiB + wheels and .gpu/ $((wheels / 1048576)) MiB (limit 64 MiB); moved files in $STASH"
