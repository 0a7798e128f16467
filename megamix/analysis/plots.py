"""The papers' figures, drawn with matplotlib: per-layer profiles, angular-distance heat maps, curves,
and the depth × step heat maps of statistics measured while training.

Figures are built with matplotlib's object API (``Figure``, no pyplot state), so plotting works
headless and never touches a caller's open figures.  Each function returns the figure; the caller
saves it (:func:`save`) and may log it to TensorBoard.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure


def _layer_ticks(num_layers: int, first: int = 0) -> range:
    """A tick per layer below 24 layers; beyond, every k-th layer so that 12 to 23 ticks remain."""
    return range(first, num_layers + first, max(1, num_layers // 12))


def _layer_axis(ax, num_layers: int) -> None:
    ax.set_xlabel("layer ℓ")
    ax.set_xticks(_layer_ticks(num_layers))
    ax.grid(alpha=0.3)


def per_layer_figure(series: dict[str, list[float]], ylabel: str, title: str, bars: bool = False,
                     log_scale: bool = False) -> Figure:
    """One value per layer for one or several runs: lines with markers, or grouped bars."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    num_layers = max(len(v) for v in series.values())
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        x = np.arange(len(values))
        if bars:
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        else:
            ax.plot(x, values, marker="o", label=name)
    if bars:
        ax.axhline(0.0, color="black", linewidth=0.8)
    if log_scale:
        ax.set_yscale("log")
    _layer_axis(ax, num_layers)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def angular_heatmaps_figure(blocks: dict[str, list[list[float]]], title: str) -> Figure:
    """Gromov et al.'s picture, one panel per run: the distance d(x_ℓ, x_ℓ+n) from start layer ℓ
    (x axis) across a block of n layers (y axis), on one shared colour scale."""
    fig = Figure(figsize=(3.6 * len(blocks) + 1.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    num_layers = max(len(b) for b in blocks.values())
    grids = {}
    for name, rows in blocks.items():
        grid = np.full((num_layers, num_layers), np.nan)
        for n, row in enumerate(rows):
            grid[n, : len(row)] = row
        grids[name] = grid
    finite = [g[np.isfinite(g)] for g in grids.values()]
    top = max((float(f.max()) for f in finite if f.size), default=1.0)
    image = None
    for ax, (name, grid) in zip(axes, grids.items()):
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0.0, vmax=top or 1.0, aspect="auto",
                          extent=(-0.5, num_layers - 0.5, 0.5, num_layers + 0.5))
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("start layer ℓ")
        ax.set_ylabel("block size n")
        ax.set_xticks(_layer_ticks(num_layers))
        ax.set_yticks(_layer_ticks(num_layers, first=1))
    fig.colorbar(image, ax=list(axes), label="angular distance")
    fig.suptitle(title, fontsize="medium")
    return fig


def _edges(centers: list[float]) -> np.ndarray:
    """Cell edges around increasing centers (half-way between neighbours)."""
    c = np.asarray(centers, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def depth_heatmaps_figure(series: dict[str, tuple[list[int], list[list[float]]]], title: str, label: str,
                          log_scale: bool = False) -> Figure:
    """One panel per run: a per-layer statistic over training, layer ℓ (y) × step (x), on one shared
    colour scale (logarithmic with ``log_scale``); cells without a value stay blank."""
    fig = Figure(figsize=(3.6 * len(series) + 1.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    grids = {name: np.asarray(values, dtype=float) for name, (_, values) in series.items()}
    finite = np.concatenate([g[np.isfinite(g) & ((g > 0) if log_scale else True)] for g in grids.values()])
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
    else:
        low, high = (1e-3, 1.0) if log_scale else (0.0, 1.0)
    norm = LogNorm(low, max(high, low * 1.0001)) if log_scale else Normalize(low, high if high > low else low + 1e-12)
    mesh = None
    for ax, (name, (steps, _)) in zip(axes, series.items()):
        grid = np.ma.masked_invalid(grids[name])
        num_layers = grid.shape[0]
        mesh = ax.pcolormesh(_edges(steps), np.arange(num_layers + 1) - 0.5, grid, cmap="viridis", norm=norm)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel("layer ℓ")
        ax.set_yticks(_layer_ticks(num_layers))
    fig.colorbar(mesh, ax=list(axes), label=label)
    fig.suptitle(title, fontsize="medium")
    return fig


def norm_scales_figure(profiles: dict[str, dict[str, list[float]]], title: str) -> Figure:
    """One panel per run: the RMS of each norm's output per layer, a line per sublayer slot
    (``attention_before``, ``mlp_after``, ...; one colour per slot in every panel), log scale; a slot
    is absent where a layer has no such norm."""
    fig = Figure(figsize=(3.6 * len(profiles) + 1.0, 3.6), layout="constrained")
    axes = fig.subplots(1, len(profiles), squeeze=False, sharey=True)[0]
    slot_names = list(dict.fromkeys(slot for slots in profiles.values() for slot in slots))
    for ax, (name, slots) in zip(axes, profiles.items()):
        num_layers = 0
        for slot, values in slots.items():
            ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=slot.replace("_", " "),
                    color=f"C{slot_names.index(slot)}")
            num_layers = max(num_layers, len(values))
        ax.set_yscale("log")
        ax.set_title(name, fontsize="medium")
        _layer_axis(ax, num_layers)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("RMS of the norm's output")
    fig.suptitle(title, fontsize="medium")
    return fig


def curves_figure(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> Figure:
    """Training loss and validation perplexity against step, one line per run.

    ``curves[name]`` holds ``"loss"`` and ``"val_ppl"`` as (step, value) pairs.
    """
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    loss_ax, ppl_ax = fig.subplots(1, 2)
    for name, c in curves.items():
        for ax, key in ((loss_ax, "loss"), (ppl_ax, "val_ppl")):
            points = [(s, v) for s, v in c.get(key, []) if math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key == "val_ppl" else None, markersize=3, label=name)
    loss_ax.set_ylabel("training loss")
    ppl_ax.set_ylabel("validation perplexity")
    ppl_ax.set_yscale("log")
    for ax in (loss_ax, ppl_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
