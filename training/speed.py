"""Seconds per training step of a config's network on its own data stream.

    OMP_NUM_THREADS=1 python -m training.speed training/configs/ct_prior_multi.yaml \\
        --channels 48,64,96,128 --channels 72,96,144,192 --steps 8

Used to size a prior for the CPU it trains on (issue 18: measure, do not guess).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from napari_mediffuse.engine.networks import DiffusionNetwork
from napari_mediffuse.engine.schedulers import alphas_cumprod, complete_schedule

from .data import MultiLevelSlices, load_volumes
from .trainer import diffusion_loss, load_config


def seconds_per_step(config: dict, stream, steps: int = 8, warmup: int = 2) -> dict:
    """Mean wall seconds of one optimiser step (forward, backward, AdamW) at
    the config's batch size, after ``warmup`` untimed steps; and the size."""
    network = DiffusionNetwork(config["architecture"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    abar = alphas_cumprod(config.get("schedule")).float()
    prediction = complete_schedule(config.get("schedule"))["prediction_type"]
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=int(config["train"]["batch_size"])))
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = diffusion_loss(network, next(loader), abar, generator, torch.device("cpu"), prediction_type=prediction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in network.parameters())
    return {"channels": network.config["backbone_config"]["block_out_channels"],
            "seconds_per_step": sum(times) / len(times), "parameters": params,
            "fp16_megabytes": round(params * 2 / 1e6, 1), "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--channels", action="append", help="block_out_channels to try, e.g. 48,64,96,128")
    parser.add_argument("--patch", type=int, action="append", help="patch sizes to try (default: the config's)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    volumes = load_volumes(config["data"], config["normalization"])
    for patch in args.patch or [int(config["data"]["patch_size"])]:
        for channels in args.channels or [None]:
            trial = copy.deepcopy(config)
            trial["data"]["patch_size"] = patch
            if channels:
                trial["architecture"]["backbone_config"]["block_out_channels"] = [int(c) for c in channels.split(",")]
            stream = MultiLevelSlices(volumes, trial["data"], seed=0)
            print({"patch": patch, **seconds_per_step(trial, stream, steps=args.steps)}, flush=True)


if __name__ == "__main__":
    main()
