"""Anomaly detection on real CT with inserted lesions (BMAD / MedDiff-FM metrics).

    python -m training.evaluate anomaly --model ct-prior-demo --out docs/evaluation

Synthetic lesions (:mod:`training.lesions`: hypo- and hyperdense, irregular
borders, internal texture) are inserted into real axial CT slices, one per
slice, in the liver and other soft tissue (spleen, kidneys, back muscles,
from the TotalSegmentator labels). Only slices the prior never saw are used:
the CT is located inside the prior's training CT (exact voxel match) and
slices before the held-out block are dropped.

For the diffusion method (:func:`napari_mediffuse.tasks.anomaly.detect_anomalies`'s
pipeline) and a simple baseline (local-intensity z-score: how far each pixel
is from the Gaussian-weighted mean of its surroundings, in local standard
deviations), both going through the same smoothing, robust normalisation
and automatic threshold, it reports, per lesion-size condition:

* image AUROC: each slice with a lesion vs the same slice without, score =
  maximum of the heatmap in the ROI;
* pixel AUROC: every ROI pixel of the normal and the lesion slices;
* PRO: area under the per-region-overlap curve up to 30 % false-positive
  rate, normalised (MVTec AD / BMAD);
* Dice of the automatic mask (the one a user gets), the best Dice over all
  thresholds (an optimistic bound, as some papers report), and the fraction
  of ROI pixels of the normal slices the automatic mask flags.

Writes ``anomaly.json``, ``anomaly_table.md`` and ``anomaly.png`` to ``--out``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

DEFAULT_CT = "../shared/data/ct/abdomen_ct_3mm_small.nii.gz"
DEFAULT_SEG = "../shared/data/ct/abdomen_ct_3mm_small_seg.nii.gz"
DEFAULT_TRAINING_CT = "../shared/data/ct/abdomen_ct_3mm.nii.gz"

#: Organs lesions are placed in (TotalSegmentator v2 labels) and their weights.
LESION_ORGANS = {"liver": ([5], 2.0), "spleen": ([1], 1.0), "kidney": ([2, 3], 1.0),
                 "back muscle": ([86, 87], 1.0)}

SIZE_CONDITIONS = {"10-30 mm": (10.0, 30.0), "5-10 mm": (5.0, 10.0)}


# -- metrics ------------------------------------------------------------------

def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks).

    ``nan`` if only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of runs of equal values
    edges = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(values)]])
    avg = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def dice(prediction, truth) -> float:
    """Dice overlap 2|P n T| / (|P| + |T|); 1.0 when both are empty."""
    p = np.asarray(prediction, dtype=bool)
    g = np.asarray(truth, dtype=bool)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((p & g).sum()) / total


def best_dice(scores, truth, n_thresholds: int = 300) -> tuple[float, float]:
    """Highest Dice over thresholds: ``(dice, threshold)``.

    Thresholds are the scores' quantiles flagging from 0.001 % to 50 % of
    the pixels (log-spaced, so small lesions get fine steps).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    flagged = np.geomspace(1e-5, 0.5, n_thresholds)
    qs = np.unique(np.quantile(scores, 1.0 - flagged))
    best = (0.0, float(qs[-1]))
    for th in qs:
        d = dice(scores > th, truth)
        if d > best[0]:
            best = (d, float(th))
    return best


def pro_auc(scores, truth, components=None, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr``.

    For each threshold, PRO is the mean over ground-truth regions of the
    fraction of the region above the threshold, and the false-positive rate
    the fraction of negative pixels above it (MVTec AD; Bergmann et al.
    2021). The curve is exact (every distinct score is a threshold),
    integrated by trapezoids and divided by ``max_fpr``.

    Parameters
    ----------
    scores : ndarray
        Anomaly scores of the evaluated pixels (any shape).
    truth : ndarray of bool
        Ground truth, same shape.
    components : ndarray of int, optional
        Region labels (0 = background); connected components of ``truth``
        (full connectivity) by default.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if components is None:
        components, _ = ndimage.label(truth, structure=np.ones((3,) * truth.ndim))
    components = np.asarray(components)
    negatives = np.sort(scores[~truth])
    if negatives.size == 0 or not truth.any():
        return float("nan")
    thresholds = np.unique(scores)[::-1]  # descending
    # fraction of negatives >= threshold
    fpr = (negatives.size - np.searchsorted(negatives, thresholds, side="left")) / negatives.size
    overlaps = []
    for label in np.unique(components[truth]):
        if label == 0:
            continue
        region = np.sort(scores[components == label])
        overlaps.append((region.size - np.searchsorted(region, thresholds, side="left")) / region.size)
    pro = np.mean(overlaps, axis=0)
    # curve from (0, pro at the top threshold) ... ; points with fpr > max_fpr cut by interpolation
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[pro[0] if fpr[1] == 0 else 0.0], pro])
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if not keep.all():
        i = int(np.argmax(~keep))  # first point beyond max_fpr
        x0, y0, x1, y1 = fpr[i - 1], pro[i - 1], fpr[i], pro[i]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.append(x, max_fpr), np.append(y, y_cut)
    return float(np.trapezoid(y, x) / max_fpr)


def slice_components(truth: np.ndarray) -> np.ndarray:
    """Connected components of a (S, H, W) mask, never joined across slices."""
    labels = np.zeros(truth.shape, dtype=np.int32)
    offset = 0
    structure = np.ones((3, 3))
    for k in range(truth.shape[0]):
        lab, n = ndimage.label(truth[k], structure=structure)
        labels[k] = np.where(lab > 0, lab + offset, 0)
        offset += n
    return labels


# -- baseline -------------------------------------------------------------------

def local_zscore_map(image_hu: np.ndarray, roi: np.ndarray, spacing, *, sigma_mm: float = 15.0,
                     window_hu=(-160.0, 240.0), noise_floor_hu: float = 5.0, plane: str = "axial") -> np.ndarray:
    """Baseline: |x - local mean| / local SD, Gaussian-weighted over the ROI in the slice plane.

    The image is clipped to the soft-tissue window first; local statistics
    use only ROI pixels (normalised convolution); ``noise_floor_hu`` keeps
    flat regions from exploding. Returns the raw score (0 outside the ROI).
    The defaults (15 mm, 5 HU) were the best of sigma 5-20 mm and floor
    5-20 HU on the evaluation's 10-30 mm lesions (a tuned baseline).
    """
    from napari_mediffuse.tasks.common import PLANE_AXIS

    x = np.clip(np.asarray(image_hu, dtype=np.float32), *window_hu)
    w = roi.astype(np.float32)
    sigma = [sigma_mm / s for s in spacing]
    sigma[PLANE_AXIS[plane]] = 0.0
    norm = np.maximum(ndimage.gaussian_filter(w, sigma), 1e-6)
    mean = ndimage.gaussian_filter(x * w, sigma) / norm
    var = ndimage.gaussian_filter(x * x * w, sigma) / norm - mean ** 2
    z = np.abs(x - mean) / np.sqrt(np.maximum(var, 0.0) + noise_floor_hu ** 2)
    return np.where(roi, z, 0.0).astype(np.float32)


def baseline_heatmap(image_hu: np.ndarray, roi: np.ndarray, spacing, *, sigma_mm: float = 15.0,
                     window_hu=None, smooth_mm: float = 3.0) -> np.ndarray:
    """The baseline's heatmap: :func:`local_zscore_map` through the diffusion
    method's in-ROI smoothing and robust normalisation (robust SDs, 0 outside)."""
    from napari_mediffuse.tasks.anomaly import robust_normalise, smooth_in_roi

    raw = local_zscore_map(image_hu, roi, spacing, sigma_mm=sigma_mm,
                           window_hu=tuple(window_hu) if window_hu else (-160.0, 240.0))
    heat, _ = robust_normalise(smooth_in_roi(raw, roi, spacing, smooth_mm=smooth_mm), roi, min_scale=0.05)
    return heat


# -- diffusion heatmaps ------------------------------------------------------------

def diffusion_configs(t_list, scores, ensemble: int, patch_mm=None) -> dict:
    """``{label: (t's, score)}``: each ``t`` alone and all of them pooled (if
    several), for each score ('spread' only where there are >= 2 reconstructions)."""
    configs = {}
    t_sets = [[t] for t in t_list] + ([list(t_list)] if len(t_list) > 1 else [])
    for ts in t_sets:
        for score in scores:
            if score == "spread" and ensemble * len(ts) < 2:
                continue
            patched = f" patches {patch_mm:g} mm" if patch_mm else ""
            configs[f"diffusion t={'+'.join(str(t) for t in ts)}{patched} {score}"] = (ts, score)
    return configs


def smoothing_variants(smooth_mm) -> list:
    """``[(label suffix, sigma mm), ...]`` for the ``--smooth-mm`` values: no
    suffix when there is one value (the tables stay as they were)."""
    values = list(dict.fromkeys(float(v) for v in np.atleast_1d(smooth_mm)))  # a repeat would overwrite rows
    return [("" if len(values) == 1 else f" smooth {v:g} mm", v) for v in values]


def matching_baseline(label: str, keys, baseline: str = "baseline local z-score") -> str:
    """The key among ``keys`` of the ``baseline`` row smoothed as the
    diffusion row ``label`` (the longest smoothing suffix ``label`` ends with)."""
    rows = [k for k in keys if k.startswith(baseline) and label.endswith(k[len(baseline):])]
    return max(rows, key=len)


def diffusion_heatmap(image_hu: np.ndarray, runs, roi: np.ndarray, spacing, *, score: str, smooth_mm: float,
                      window_hu=None, polarity: str = "both"):
    """Heatmap and pooled reconstruction from ``runs`` = ``[(reconstruction,
    spread), ...]`` (one per ``t``, from ``healthy_reconstruction(...,
    return_spread=True)``). The 'spread' score pools the ensemble spread over
    the t's: mean within-t variance + variance of the t means."""
    from napari_mediffuse.tasks.anomaly import residual_heatmap

    stacked = np.stack([rec for rec, _ in runs])
    rec = stacked.mean(0)
    spread = None
    if score == "spread":
        spread = np.sqrt(np.mean([s ** 2 for _, s in runs], axis=0) + stacked.var(0))
    heat, _ = residual_heatmap(image_hu, rec, roi, spacing, spread_hu=spread, smooth_mm=smooth_mm,
                               window_hu=window_hu, polarity=polarity)
    return heat, rec


# -- data -----------------------------------------------------------------------

def held_out_slices(ct, training_ct_path, holdout_fraction: float) -> tuple[np.ndarray, str]:
    """Axial indices of ``ct`` the prior never saw, and a sentence saying why.

    ``ct`` is searched in the training CT (exact voxel match of the axial
    slices); the training set is its first ``1 - holdout_fraction`` axial
    slices (inferior part), as in :mod:`training.data`.
    """
    from napari_mediffuse import io

    n = ct.data.shape[0]
    path = Path(training_ct_path) if training_ct_path else None
    if path is None or not path.exists():
        return np.arange(n), "training CT not given: all slices used (may include training slices)"
    train = io.read(path)[0].data
    if train.shape[1:] != ct.data.shape[1:]:
        return np.arange(n), f"{path.name} has another slice size: treated as unseen"
    start = train.shape[0] - int(round(holdout_fraction * train.shape[0]))
    for offset in range(train.shape[0] - n + 1):
        if np.array_equal(train[offset], ct.data[0]) and np.array_equal(train[offset:offset + n], ct.data):
            keep = np.arange(n)[np.arange(n) + offset >= start]
            return keep, (f"{ct.source or ct.name} is axial slices {offset}-{offset + n - 1} of the training CT "
                          f"{path.name}; its held-out block is slices {start}-{train.shape[0] - 1}, so slices "
                          f"{keep[0] if len(keep) else '-'}-{keep[-1] if len(keep) else '-'} "
                          f"of the evaluation CT are used")
    return np.arange(n), f"not found inside {path.name}: all slices treated as unseen"


def organ_masks(seg: np.ndarray) -> dict:
    return {name: np.isin(seg, labels) for name, (labels, _) in LESION_ORGANS.items()}


def make_lesion_volume(clean: np.ndarray, organs: dict, spacing2d, rng, size_range, contrast_range):
    """Insert one lesion per slice; returns (image, truth, list of lesion dicts)."""
    from training.lesions import random_lesion

    weights = {name: w for name, (_, w) in LESION_ORGANS.items()}
    image = clean.astype(np.float32).copy()
    truth = np.zeros(clean.shape, dtype=bool)
    info = []
    for k in range(clean.shape[0]):
        kind = "hypo" if k % 2 == 0 else "hyper"
        slice_organs = {n: m[k] for n, m in organs.items()}
        out, mask, lesion = random_lesion(image[k], slice_organs, spacing2d, rng, size_range_mm=size_range,
                                          contrast_range_hu=contrast_range, kind=kind, organ_weights=weights)
        image[k], truth[k] = out, mask
        info.append(dict(slice=k, organ=lesion.organ, kind=lesion.kind, diameter_mm=round(lesion.diameter_mm, 1),
                         measured_diameter_mm=round(lesion.measured_diameter_mm, 1),
                         contrast_hu=round(lesion.contrast_hu, 1),
                         measured_contrast_hu=round(lesion.measured_contrast_hu, 1),
                         necrotic_core=lesion.extra["necrotic_core"]))
    return image, truth, info


# -- evaluation -----------------------------------------------------------------

def score_method(normal_map, normal_roi, lesion_map, lesion_roi, truth, *, percentile, min_threshold):
    """All metrics of one heatmap pair (normal slices, lesion slices)."""
    from napari_mediffuse.tasks.anomaly import auto_threshold

    img_scores = np.concatenate([_slice_max(normal_map, normal_roi), _slice_max(lesion_map, lesion_roi)])
    img_labels = np.r_[np.zeros(len(normal_map)), np.ones(len(lesion_map))]
    pix_scores = np.concatenate([normal_map[normal_roi], lesion_map[lesion_roi]])
    pix_truth = np.concatenate([np.zeros(int(normal_roi.sum()), bool), truth[lesion_roi]])
    comps = slice_components(truth & lesion_roi)
    pro_scores = np.concatenate([normal_map[normal_roi], lesion_map[lesion_roi]])
    pro_comps = np.concatenate([np.zeros(int(normal_roi.sum()), np.int32), comps[lesion_roi]])
    thr_lesion = auto_threshold(lesion_map, lesion_roi, percentile=percentile, minimum=min_threshold)
    thr_normal = auto_threshold(normal_map, normal_roi, percentile=percentile, minimum=min_threshold)
    auto_mask = (lesion_map > thr_lesion) & lesion_roi
    bd, bt = best_dice(lesion_map[lesion_roi], truth[lesion_roi])
    return {
        "image_auroc": auroc(img_scores, img_labels),
        "pixel_auroc": auroc(pix_scores, pix_truth),
        "pro": pro_auc(pro_scores, pro_comps > 0, components=pro_comps),
        "dice": dice(auto_mask, truth),
        "dice_best": bd,
        "threshold": thr_lesion,
        "threshold_best": bt,
        "normal_flagged_fraction": float(((normal_map > thr_normal) & normal_roi).sum() / normal_roi.sum()),
    }


def _slice_max(heat, roi):
    return np.array([float(h[r].max()) if r.any() else 0.0 for h, r in zip(heat, roi)])


def run(args) -> dict:
    import torch

    from napari_mediffuse import io
    from napari_mediffuse.tasks.anomaly import healthy_reconstruction
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.inpaint import prepare_prior
    from napari_mediffuse.tasks.masks import body_mask

    torch.set_num_threads(max(1, args.threads))
    ct = io.read(args.ct)[0]
    seg = io.read(args.seg)[0]
    if seg.data.shape != ct.data.shape:
        raise ValueError(f"segmentation {seg.data.shape} is not on the CT grid {ct.data.shape}")
    keep, provenance = held_out_slices(ct, args.training_ct, args.holdout_fraction)
    organs_all = organ_masks(seg.data)
    has_organ = np.array([any(m[k].sum() >= 40 for m in organs_all.values()) for k in range(ct.data.shape[0])])
    keep = keep[has_organ[keep]]
    if args.slices and len(keep) > args.slices:
        keep = keep[np.linspace(0, len(keep) - 1, args.slices).round().astype(int)]
    if len(keep) == 0:
        raise ValueError("no held-out slice with an organ to place lesions in")
    log.info("%s; evaluating %d slices: %s", provenance, len(keep), keep.tolist())
    clean = ct.data[keep].astype(np.float32)
    organs = {n: m[keep] for n, m in organs_all.items()}
    spacing = ct.spacing
    affine = ct.affine.copy()  # grid of the stacked slices (only spacing matters per slice)

    def volume_of(data, name):
        return io.Volume(data=data, affine=affine, modality="CT", name=name)

    rng = np.random.default_rng(args.seed)
    conditions = {}
    for cname in args.sizes:
        image, truth, info = make_lesion_volume(clean, organs, spacing[1:], rng, SIZE_CONDITIONS[cname],
                                                tuple(args.contrast_hu))
        conditions[cname] = dict(image=image, truth=truth, lesions=info)

    options = RunOptions(device=args.device, seed=args.seed, batch_size=args.batch_size)
    normal_vol = volume_of(clean, "normal")
    prior = prepare_prior(normal_vol, args.model, options, task="anomaly evaluation")
    organ_union = np.any(np.stack(list(organs.values())), axis=0)

    def roi_of(vol):
        if args.roi == "organs":
            return ndimage.binary_dilation(organ_union, structure=np.ones((1, 3, 3)))
        return body_mask(vol)

    window = tuple(args.window_hu) if args.window_hu else None
    thr_kwargs = dict(percentile=args.percentile, min_threshold=args.min_threshold)

    # reconstructions: per t (ensemble mean), normal and lesion volumes
    recs, timing = {}, {}
    volumes = {"normal": normal_vol}
    volumes.update({c: volume_of(d["image"], c) for c, d in conditions.items()})
    rois = {name: roi_of(v) for name, v in volumes.items()}
    for t in args.t:
        for name, vol in volumes.items():
            start = time.perf_counter()
            recs[(t, name)] = healthy_reconstruction(vol, rois[name], prior, t=t, ensemble=args.ensemble,
                                                     steps=args.steps, eta=args.eta, options=options,
                                                     patch_mm=args.patch_mm or None, t_end=args.t_end,
                                                     return_spread=True)
            timing[(t, name)] = time.perf_counter() - start
            log.info("t=%d %s: %.1f s (%.2f s/slice)", t, name, timing[(t, name)], timing[(t, name)] / len(keep))
    configs = diffusion_configs(args.t, args.scores, args.ensemble, args.patch_mm)

    def diffusion_map(name, ts, score, smooth_mm):
        return diffusion_heatmap(volumes[name].data, [recs[(t, name)] for t in ts], rois[name], spacing,
                                 score=score, smooth_mm=smooth_mm, window_hu=window)

    def baseline_map(name, smooth_mm):
        return baseline_heatmap(volumes[name].data, rois[name], spacing, sigma_mm=args.baseline_sigma_mm,
                                window_hu=window, smooth_mm=smooth_mm)

    results = {}
    maps_for_figure = {}
    for cname, cond in conditions.items():
        results[cname] = {}
        for suffix, smooth_mm in smoothing_variants(args.smooth_mm):
            for label, (ts, score) in configs.items():
                n_map, _ = diffusion_map("normal", ts, score, smooth_mm)
                l_map, l_rec = diffusion_map(cname, ts, score, smooth_mm)
                results[cname][label + suffix] = score_method(n_map, rois["normal"], l_map, rois[cname],
                                                              cond["truth"], **thr_kwargs)
                maps_for_figure[(cname, label + suffix)] = (l_map, l_rec)
            b_n, b_l = baseline_map("normal", smooth_mm), baseline_map(cname, smooth_mm)
            results[cname]["baseline local z-score" + suffix] = score_method(b_n, rois["normal"], b_l, rois[cname],
                                                                             cond["truth"], **thr_kwargs)
            maps_for_figure[(cname, "baseline local z-score" + suffix)] = (b_l, None)

    seconds_per_slice = {str(t): float(np.mean([timing[(t, n)] for n in volumes]) / len(keep)) for t in args.t}
    report = {
        "command": args.command_line,
        "model": prior.name,
        "data": {"ct": str(args.ct), "segmentation": str(args.seg), "provenance": provenance,
                 "slices": keep.tolist(), "roi": args.roi},
        "settings": {"t": args.t, "t_end": args.t_end, "patch_mm": args.patch_mm, "scores": args.scores,
                     "ensemble": args.ensemble, "steps": args.steps, "eta": args.eta,
                     "smooth_mm": args.smooth_mm, "window_hu": args.window_hu, "percentile": args.percentile,
                     "min_threshold": args.min_threshold, "contrast_hu": args.contrast_hu,
                     "baseline_sigma_mm": args.baseline_sigma_mm, "seed": args.seed, "device": args.device,
                     "threads": args.threads},
        "seconds_per_slice": seconds_per_slice,
        "results": results,
        "lesions": {c: d["lesions"] for c, d in conditions.items()},
        "targets": {"condition": "10-30 mm", "pixel_auroc": 0.95, "dice": 0.30,
                    "meddiff_fm_bmad_liver": {"image_auroc": 0.853, "pixel_auroc": 0.976, "pro": 0.966,
                                              "dice": 0.274}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anomaly.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    table = markdown_table(report)
    (out / "anomaly_table.md").write_text(table + "\n")
    print(table)
    first = next(iter(conditions))
    best_label = max((k for k in results[first] if k.startswith("diffusion")),
                     key=lambda k: results[first][k]["pixel_auroc"])
    base_label = matching_baseline(best_label, results[first])
    save_figure(out / "anomaly.png", conditions[first], maps_for_figure[(first, best_label)],
                maps_for_figure[(first, base_label)], rois[first],
                results[first][best_label]["threshold"], results[first][base_label]["threshold"],
                titles=(best_label, base_label))
    return report


def markdown_table(report: dict) -> str:
    lines = ["| lesions | method | image AUROC | pixel AUROC | PRO (FPR<=0.3) | Dice (auto threshold) | "
             "Dice (best threshold) | normal pixels flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for cname, methods in report["results"].items():
        for method, m in methods.items():
            lines.append(f"| {cname} | {method} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                         f"{m['pro']:.3f} | {m['dice']:.3f} | {m['dice_best']:.3f} | "
                         f"{100 * m['normal_flagged_fraction']:.2f} % |")
    return "\n".join(lines)


# -- picture ----------------------------------------------------------------------

def _gray(x, low=-160.0, high=240.0):
    v = np.clip((np.asarray(x, float) - low) / (high - low), 0, 1)
    return np.repeat((v * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _heat(x, vmax):
    from napari.utils.colormaps import ensure_colormap

    v = np.clip(np.asarray(x, float) / max(vmax, 1e-6), 0, 1)
    rgba = ensure_colormap("inferno").map(v.ravel()).reshape(*v.shape, 4)
    return (rgba[..., :3] * 255).astype(np.uint8)


def _overlay(base, pred, truth):
    out = base.copy()
    edge = truth & ~ndimage.binary_erosion(truth)
    out[pred & truth] = (0, 200, 0)
    out[pred & ~truth] = (230, 40, 40)
    out[edge & ~pred] = (60, 120, 255)
    return out


def save_figure(path, condition, diffusion, baseline, roi, thr_d, thr_b, *, rows: int = 4,
                titles=("diffusion", "baseline")):
    """Rows of example slices: CT with lesion (outline), reconstruction,
    diffusion heatmap, its mask, baseline heatmap, its mask
    (green = hit, red = false positive, blue = missed lesion edge)."""
    from PIL import Image, ImageDraw

    image, truth = condition["image"], condition["truth"]
    d_map, d_rec = diffusion
    b_map, _ = baseline
    n = image.shape[0]
    picks = np.linspace(0, n - 1, min(rows, n)).round().astype(int)
    tiles = []
    for k in picks:
        ct = _gray(image[k])
        edge = truth[k] & ~ndimage.binary_erosion(truth[k])
        ct_outline = ct.copy()
        ct_outline[edge] = (60, 120, 255)
        row = [ct_outline, _gray(d_rec[k]), _heat(d_map[k], 2 * thr_d),
               _overlay(_gray(image[k]), d_map[k] > thr_d, truth[k]),
               _heat(b_map[k], 2 * thr_b), _overlay(_gray(image[k]), b_map[k] > thr_b, truth[k])]
        tiles.append(np.concatenate(row, axis=1))
    grid = np.concatenate(tiles, axis=0)
    grid = np.kron(grid, np.ones((2, 2, 1), dtype=np.uint8))
    header = 18
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    w = grid.shape[1] // 6
    labels = ["CT + lesion (outline)", "healthy reconstruction", f"heatmap: {titles[0]}", "mask (auto)",
              f"heatmap: {titles[1]}", "mask (auto)"]
    for i, text in enumerate(labels):
        draw.text((i * w + 4, 3), text, fill=(0, 0, 0))
    canvas.save(path)


# -- inpainting example ------------------------------------------------------------

def inpaint_example(args) -> int:
    """20 mm liver lesions in 3 held-out slices, inpainted with the defaults;
    writes inpaint.json (MAE inside the mask vs the original) and inpaint.png."""
    from PIL import Image, ImageDraw

    from napari_mediffuse import io
    from napari_mediffuse.tasks.common import RunOptions
    from napari_mediffuse.tasks.inpaint import inpaint
    from training.lesions import insert_lesion

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    ct = io.read(DEFAULT_CT)[0]
    seg = io.read(DEFAULT_SEG)[0].data
    ks = [14, 20, 26]  # held-out slices (training-CT slices 96, 102, 108)
    vol = io.Volume(ct.data[ks].astype(np.float32), ct.affine, modality="CT", name="held-out")
    rng = np.random.default_rng(5)
    sick = vol.data.copy()
    truth = np.zeros(sick.shape, bool)
    for i, k in enumerate(ks):
        sick[i], truth[i], _ = insert_lesion(sick[i], seg[k] == 5, (3, 3), diameter_mm=20,
                                             contrast_hu=-60 if i % 2 == 0 else 60, rng=rng)
    mask = ndimage.binary_dilation(truth, structure=np.ones((1, 3, 3)))
    start = time.perf_counter()
    result = inpaint(vol.with_data(sick), mask, model=args.model,
                     options=RunOptions(seed=0, batch_size=4, device=args.device))
    seconds = time.perf_counter() - start
    ring = ndimage.binary_dilation(mask, structure=np.ones((1, 5, 5))) & ~mask
    fill = sick.copy()
    for i in range(len(ks)):
        fill[i][mask[i]] = np.median(sick[i][ring[i]])
    report = {
        "slices_small_ct": ks, "seconds": round(seconds, 1), "seconds_per_slice": round(seconds / len(ks), 1),
        "params": result.metadata["parameters"],
        "mae_hu_inside_mask": {
            "lesion (before)": float(np.abs(sick - vol.data)[mask].mean()),
            "diffusion inpainting": float(np.abs(result.data - vol.data)[mask].mean()),
            "median of the surrounding ring": float(np.abs(fill - vol.data)[mask].mean())},
        "outside_unchanged": bool(np.array_equal(result.data[~mask], sick[~mask])),
    }
    print(json.dumps(report, indent=1))
    (folder / "inpaint.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = []
    for i in range(len(ks)):
        edge = mask[i] & ~ndimage.binary_erosion(mask[i])
        with_lesion = _gray(sick[i])
        with_lesion[edge] = (60, 120, 255)
        rows.append(np.concatenate([with_lesion, _gray(result.data[i]), _gray(vol.data[i])], axis=1))
    grid = np.kron(np.concatenate(rows, 0), np.ones((2, 2, 1), np.uint8))
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 18), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, 18))
    draw = ImageDraw.Draw(canvas)
    width = grid.shape[1] // 3
    for j, text in enumerate(["CT + inserted lesion, mask (outline)", "inpainted (RePaint, demo prior)",
                              "original (truth)"]):
        draw.text((j * width + 4, 3), text, fill=(0, 0, 0))
    canvas.save(folder / "inpaint.png")
    return 0


# -- command line ------------------------------------------------------------------

def add_command(subparsers) -> None:
    p = subparsers.add_parser("anomaly", help="anomaly detection on held-out CT slices with inserted lesions",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ct-prior-demo", help="checkpoint name or folder")
    p.add_argument("--ct", default=DEFAULT_CT, help="CT (NIfTI, HU) with normal anatomy")
    p.add_argument("--seg", default=DEFAULT_SEG, help="TotalSegmentator labels of --ct")
    p.add_argument("--training-ct", default=DEFAULT_TRAINING_CT,
                   help="the prior's training CT, to keep only held-out slices ('' to skip)")
    p.add_argument("--holdout-fraction", type=float, default=0.2)
    p.add_argument("--slices", type=int, default=12, help="evaluate at most this many slices (0 = all)")
    p.add_argument("--sizes", nargs="+", default=list(SIZE_CONDITIONS), choices=list(SIZE_CONDITIONS))
    p.add_argument("--contrast-hu", type=float, nargs=2, default=[30.0, 90.0],
                   help="range of |lesion contrast| in HU (default 30 90)")
    p.add_argument("--t", type=int, nargs="+", default=None,
                   help="noise step(s); each is evaluated, and their average if several (default: the task's)")
    p.add_argument("--ensemble", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--t-end", type=int, default=None, help="sampler stop step (default: the task's)")
    p.add_argument("--patch-mm", type=float, default=None,
                   help="patched reconstruction cell size in mm (0 = whole ROI; default: the task's)")
    p.add_argument("--scores", nargs="+", choices=["residual", "spread"], default=["residual", "spread"],
                   help="diffusion scores to evaluate (both come from the same reconstructions)")
    p.add_argument("--roi", choices=["body", "organs"], default="body")
    add_heatmap_options(p, threads=2)
    p.set_defaults(func=_run_cli)

    q = subparsers.add_parser("inpaint-example", help="inpaint inserted liver lesions in held-out CT slices")
    q.add_argument("--model", default="ct-prior-demo")
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", default="docs/evaluation")
    q.set_defaults(func=inpaint_example)


def add_heatmap_options(p, *, threads: int) -> None:
    """Options shared by the anomaly evaluations: heatmap post-processing
    (None = the task's defaults, see :func:`fill_task_defaults`), the
    baseline, the run and the output folder."""
    p.add_argument("--smooth-mm", type=float, nargs="+", default=None,
                   help="in-plane smoothing of the heatmaps (mm); several values give rows for each, from the "
                        "same reconstructions (default: the task's)")
    p.add_argument("--window-hu", type=float, nargs=2, default=None)
    p.add_argument("--percentile", type=float, default=None)
    p.add_argument("--min-threshold", type=float, default=None)
    p.add_argument("--baseline-sigma-mm", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--out", default="docs/evaluation")


def fill_task_defaults(args) -> None:
    """Options left unset (None) take the anomaly task's defaults, and
    ``args.command_line`` records the command (for the tables' headers)."""
    from . import command_line

    from napari_mediffuse.tasks import anomaly as task

    defaults = dict(t=[task.DEFAULT_T], t_end=task.DEFAULT_T_END, patch_mm=task.DEFAULT_PATCH_MM or 0.0,
                    ensemble=task.DEFAULT_ENSEMBLE, steps=task.DEFAULT_STEPS,
                    smooth_mm=[task.DEFAULT_SMOOTH_MM], window_hu=list(task.DEFAULT_WINDOW_HU),
                    percentile=task.DEFAULT_PERCENTILE, min_threshold=task.DEFAULT_MIN_THRESHOLD)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.command_line = command_line()


def _run_cli(args) -> int:
    fill_task_defaults(args)
    run(args)
    return 0


__all__ = ["auroc", "baseline_heatmap", "best_dice", "dice", "diffusion_configs", "diffusion_heatmap",
           "local_zscore_map", "pro_auc", "run", "matching_baseline", "slice_components", "smoothing_variants"]
