"""Forward latency of SA-CMF per image backbone: the model card's latency table, from one command.

Why a benchmark of untrained models: latency depends on the architecture, not on the weights, so every
backbone can be timed without training each one (InceptionV3 uses PyTorch's default init, see
``model/backbones.py``: the truncated-normal init gives erratic CPU timings). Inputs are real synthetic
scenes through the shared preprocessing. Backbones are timed in interleaved rounds, so that a noisy
neighbour on a shared machine slows all of them alike; each figure is the median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.preprocess import collate, preprocess, raw_from_scene
from model.sacmf import SACMFConfig, build_model
from model.synth import SynthConfig, generate_scene, scene_seed


@dataclass(frozen=True)
class LatencyRow:
    backbone: str
    batch: int
    ms_per_batch: float
    ms_per_window: float
    windows_per_s: float
    params_m: float


def synthetic_batch(cfg: SACMFConfig, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` generated scenes, preprocessed exactly as files and streams are."""
    pcfg = cfg.preprocess_config()
    scfg = SynthConfig(size=cfg.frame_size, seq_len=cfg.seq_len)
    return collate([preprocess(raw_from_scene(generate_scene(scene_seed(seed, i, 9), scfg)), pcfg) for i in range(n)])


@torch.inference_mode()
def backbone_latency(
    backbones: Sequence[str], batches: Sequence[int], frame_size: int = 64, rounds: int = 20, calls: int = 3
) -> list[LatencyRow]:
    """Median over ``rounds`` of the mean of ``calls`` forwards, per (backbone, batch)."""
    models, inputs = {}, {}
    for name in backbones:
        torch.manual_seed(0)
        cfg = SACMFConfig(backbone=name, frame_size=frame_size)
        models[name] = build_model(cfg).eval()
        full = synthetic_batch(cfg, max(batches))
        for b in batches:
            inputs[name, b] = {k: v[:b] for k, v in full.items()}
            for _ in range(2):  # warm-up: allocator, lazy init
                models[name](inputs[name, b])
    times: dict[tuple[str, int], list[float]] = {key: [] for key in inputs}
    for _ in range(rounds):
        for key, x in inputs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                models[key[0]](x)
            times[key].append((time.perf_counter() - t0) / calls)
    rows = []
    for (name, b), ts in times.items():
        s = statistics.median(ts)
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        rows.append(LatencyRow(name, b, s * 1e3, s * 1e3 / b, b / s, params))
    return rows
