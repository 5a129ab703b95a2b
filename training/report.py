"""Loss-curve picture of a run's ``log.jsonl`` (Pillow only, no plotting library)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from .trainer import read_log


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def loss_curve(run, path, *, width: int = 720, height: int = 360, smooth: int = 10) -> Path:
    """Training loss (smoothed, log scale) and validation loss against step."""
    records = read_log(run)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        raise ValueError(f"{run}: no training loss in log.jsonl")
    steps = [s for s, _ in train]
    losses = _smooth([v for _, v in train], smooth)
    all_values = losses + [v for _, v in val]
    lo, hi = math.log10(min(all_values)), math.log10(max(all_values))
    hi = hi if hi > lo else lo + 1
    margin = 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def xy(step, value):
        x = margin + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * margin)
        y = height - margin - (math.log10(value) - lo) / (hi - lo) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for k in range(5):
        value = 10 ** (lo + k / 4 * (hi - lo))
        _, y = xy(steps[0], value)
        draw.line([margin - 5, y, margin, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    for k in range(5):
        step = steps[0] + k / 4 * (steps[-1] - steps[0])
        x, _ = xy(step, 10 ** lo)
        draw.line([x, height - margin, x, height - margin + 5], fill="black")
        draw.text((x - 15, height - margin + 8), f"{int(step)}", fill="black")
    draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(31, 119, 180), width=2)
    for s, v in val:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
    draw.text((margin, 20), "training loss (blue, smoothed) and held-out validation loss (red) vs step; log scale",
              fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_markdown(lines: list[str], out) -> str:
    """Write a benchmark's or evaluation's Markdown lines to ``out`` (folders made) and return the text."""
    text = "\n".join(lines) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text


def write_report(lines: list[str], out, record: dict) -> str:
    """The Markdown text of ``lines``; with ``out``, also written there and ``record`` as JSON beside it."""
    if not out:
        return "\n".join(lines) + "\n"
    text = write_markdown(lines, out)  # makes the folder
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return text
