"""Several runs side by side: loss curves, a final-metric table and the per-layer profiles.

The papers' qualitative claims are about the *shape* of per-layer profiles (Pre-LN's deep layers get
small gradients and change the hidden state little; Mix-LN evens this out), so besides the full
per-layer tables the summary gives each profile as "shallow half → deep half" means, and the
spread of the training gradient norms across layers (coefficient of variation: 0 is perfectly even).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from megamix.analysis import plots
from megamix.analysis.report import TOKEN_DESCRIPTION
from megamix.analysis.runs import Run, load_run
from megamix.schemes import describe_schemes


def halves(values: list[float]) -> tuple[float, float]:
    """Means of the shallower and of the deeper half of the layers (the middle layer of an odd
    count belongs to neither)."""
    half = len(values) // 2
    return statistics.fmean(values[:half]), statistics.fmean(values[len(values) - half:])


def coefficient_of_variation(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


# The per-layer profiles a run can show, each None when the run does not have it.
def training_grad_norms(run: Run) -> list[float] | None:
    return run.training_grad_norms()


def checkpoint_grad_norms(run: Run) -> list[float] | None:
    return run.analysis["grad_norm"]["mean"] if run.analysis else None


def angular_distances(run: Run) -> list[float] | None:
    return run.analysis["angular_distance"]["per_layer"] if run.analysis else None


def removal_costs(run: Run) -> list[float] | None:
    return [r["loss_increase"] for r in run.analysis["layer_removal"]["layers"]] if run.analysis else None


def _token_mode(runs: list[Run]) -> str:
    modes = {run.analysis["angular_distance"]["tokens"] for run in runs if run.analysis}
    return ", ".join(TOKEN_DESCRIPTION[m] for m in sorted(modes))


PROFILES: dict[str, tuple[Callable[[Run], list[float] | None], str, str]] = {
    # file stem: (profile, y label, title)
    "grad_norms_training": (training_grad_norms, "gradient norm ‖∇W_ℓ‖",
                            "Gradient norm per layer, mean over the logged training steps"),
    "grad_norms_checkpoint": (checkpoint_grad_norms, "gradient norm ‖∇W_ℓ‖",
                              "Gradient norm per layer at the analyzed checkpoint"),
    "angular_distance": (angular_distances, "angular distance d(x_ℓ, x_ℓ+1)", "Angular distance per layer"),
    "layer_removal": (removal_costs, "validation loss increase (nats)", "Performance drop when layer ℓ is removed"),
}


def _number(value: float, fmt: str) -> str:
    return f"{value:{fmt}}" if math.isfinite(value) else f"{value} (diverged)"


def _shallow_to_deep(values: list[float] | None, fmt: str = ".3g") -> str:
    if not values or len(values) < 2:
        return "–"
    shallow, deep = halves(values)
    return f"{shallow:{fmt}} → {deep:{fmt}}"


def summary_table(runs: list[Run]) -> str:
    lines = [
        "| run | scheme | layers | steps | train loss | val loss | val ppl | grad norm, training (shallow → deep) "
        "| grad norm CV | angular distance (shallow → deep) | loss increase when removed (shallow → deep) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        final = run.final_eval
        grads = training_grad_norms(run)
        cv = f"{coefficient_of_variation(grads):.2f}" if grads else "–"
        lines.append(
            f"| {run.name} | {run.scheme} | {describe_schemes(run.schemes)} | {run.steps} "
            f"| {_number(run.final_train_loss, '.4f')} | {_number(final['val_loss'], '.4f')} "
            f"| {_number(final['val_ppl'], '.2f')} | {_shallow_to_deep(grads)} | {cv} "
            f"| {_shallow_to_deep(angular_distances(run))} | {_shallow_to_deep(removal_costs(run), '+.3g')} |"
        )
    return "\n".join(lines)


def mean_and_spread(values: list[float], fmt: str) -> str:
    """``mean ± sd`` over seeds (the sample standard deviation; ``± –`` for a single seed), of the
    finite values only."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "– (diverged)"
    spread = f"{statistics.stdev(finite):{fmt}}" if len(finite) > 1 else "–"
    return f"{statistics.fmean(finite):{fmt}} ± {spread}"


def seeds_table(groups: dict[str, list[Run]]) -> str:
    """One row per configuration (e.g. a scheme at a learning rate), over its seeds: the final
    validation loss and perplexity and the last training loss as mean ± standard deviation, and
    how many seeds diverged (a non-finite final loss; those are left out of the means)."""
    lines = ["| run | scheme | lr | seeds | val loss | val ppl | train loss | diverged |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        finals = [run.final_eval for run in runs]
        diverged = sum(not (math.isfinite(f["val_loss"]) and math.isfinite(r.final_train_loss))
                       for f, r in zip(finals, runs))
        lrs = sorted({run.config.train.lr for run in runs})
        lines.append(
            f"| {name} | {runs[0].scheme} | {', '.join(f'{lr:g}' for lr in lrs)} | {len(runs)} "
            f"| {mean_and_spread([f['val_loss'] for f in finals], '.4f')} "
            f"| {mean_and_spread([f['val_ppl'] for f in finals], '.2f')} "
            f"| {mean_and_spread([r.final_train_loss for r in runs], '.4f')} | {diverged} of {len(runs)} |"
        )
    return "\n".join(lines)


def per_layer_table(runs: list[Run], profile: Callable[[Run], list[float] | None], fmt: str) -> str | None:
    """Rows = runs, columns = layers; None when no run has this profile."""
    rows = [(run, profile(run)) for run in runs]
    rows = [(run, values) for run, values in rows if values]
    if not rows:
        return None
    num_layers = max(len(values) for _, values in rows)
    lines = ["| run | " + " | ".join(f"ℓ={i}" for i in range(num_layers)) + " |",
             "|---|" + "---|" * num_layers]
    for run, values in rows:
        cells = [f"{v:{fmt}}" for v in values] + [""] * (num_layers - len(values))
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Depth statistics measured while training (train.stats_interval; docs/instruments.md), drawn as
# depth × step heat maps: file stem → (statistic, colour-bar label, title, log colour scale).
DEPTH_FIGURES: dict[str, tuple[str, str, str, bool]] = {
    "depth_rms": ("rms", "RMS of x_ℓ+1", "RMS of the residual stream after each layer, over training", True),
    "depth_angular": ("angular", "d(x_ℓ, x_ℓ+1)",
                      "Angular distance between each layer's input and output (probe tokens), over training", False),
    "depth_update_ratio": ("update_ratio", "‖ΔW‖ / ‖W‖", "Update-to-weight ratio per layer, over training", True),
    "depth_grad_norm": ("grad_norm", "‖∇W_ℓ‖", "Gradient norm per layer, over training", True),
    "depth_attn_logit_max": ("attn_logit_max", "max q·k/√d", "Largest attention logit per layer (probe), over "
                             "training", False),
    "depth_attn_entropy": ("attn_entropy", "entropy (nats)", "Mean attention entropy per layer (probe), over "
                           "training", False),
}
NORM_SLOT_NAMES = [f"{sublayer}_{slot}" for sublayer in ("attention", "mlp") for slot in ("before", "output", "after")
                   ] + ["attention_q", "attention_k", "attention_v"]  # the norms on q, k and v


def last_stats(run: Run, stat: str) -> list[float] | None:
    """A depth statistic per layer at the run's last statistics step (None without statistics)."""
    series = run.depth_series(stat)
    return [row[-1] for row in series[1]] if series and run.stats else None


def norm_scales(run: Run) -> dict[str, list[float]]:
    """``{slot: RMS of that norm's output per layer}`` at the last statistics step, slots the run has."""
    out = {}
    for slot in NORM_SLOT_NAMES:
        series = run.depth_series("norm_out", f"/{slot}")
        if series:
            out[slot] = [row[-1] for row in series[1]]
    return out


def depth_markdown(runs: list[Run]) -> list[str]:
    """Sections for the depth statistics: shallow → deep at the last statistics step, per-layer
    tables, and the instability events."""
    with_stats = [run for run in runs if run.stats]
    if not with_stats:
        return []
    lines = ["| run | scheme | stats step | RMS after layer (shallow → deep) | angular distance | update ratio "
             "| spike events |", "|---|---|---|---|---|---|---|"]
    for run in with_stats:
        lines.append(f"| {run.name} | {run.scheme} | {run.stats[-1]['step']} "
                     f"| {_shallow_to_deep(last_stats(run, 'rms'))} | {_shallow_to_deep(last_stats(run, 'angular'))} "
                     f"| {_shallow_to_deep(last_stats(run, 'update_ratio'))} "
                     f"| {sum(1 for e in run.events if e.get('event', '').endswith('_spike'))} |")
    sections = ["", "## Depth statistics while training (last statistics step)", "", "\n".join(lines)]
    for stat, title in (("rms", "RMS of the residual stream after layer ℓ"),
                        ("angular", "Angular distance d(x_ℓ, x_ℓ+1), all probe tokens")):
        table = per_layer_table(with_stats, lambda run, stat=stat: last_stats(run, stat), ".4g")
        if table:
            sections += ["", f"## {title}, at the last statistics step", "", table]
    return sections


def comparison_markdown(runs: list[Run]) -> str:
    sections = ["## Final metrics", "", summary_table(runs)]
    for stem, (profile, _, title) in PROFILES.items():
        table = per_layer_table(runs, profile, "+.4f" if stem == "layer_removal" else ".4g")
        if table:
            note = {"angular_distance": f" ({_token_mode(runs)})", "layer_removal": " (validation loss increase, nats)"}
            note = note.get(stem, "")
            sections += ["", f"## {title}{note}", "", table]
    sections += depth_markdown(runs)
    return "\n".join(sections) + "\n"


def comparison_figures(runs: list[Run]) -> dict[str, Figure]:
    """``curves`` always; each per-layer profile and ``angular_heatmaps`` when some run has them."""
    figures = {"curves": plots.curves_figure({
        run.name: {"loss": [(r["step"], r["loss"]) for r in run.train],
                   "val_ppl": [(r["step"], r["val_ppl"]) for r in run.eval]}
        for run in runs
    })}
    for stem, (profile, ylabel, title) in PROFILES.items():
        series = {run.name: values for run in runs if (values := profile(run))}
        if series:
            if stem == "angular_distance":
                title = f"{title} ({_token_mode(runs)})"
            figures[stem] = plots.per_layer_figure(series, ylabel, title, log_scale=stem.startswith("grad_norms"))
    figures.update(depth_figures(runs))
    analyzed = [run for run in runs if run.analysis]
    if analyzed:
        figures["angular_heatmaps"] = plots.angular_heatmaps_figure(
            {run.name: run.analysis["angular_distance"]["blocks"] for run in analyzed},
            f"Angular distance d(x_ℓ, x_ℓ+n) across n layers ({_token_mode(analyzed)})",
        )
    return figures


def depth_figures(runs: list[Run]) -> dict[str, Figure]:
    """The depth × step heat maps of every statistic some run has, and the norms' output scales."""
    figures = {}
    for stem, (stat, label, title, log_scale) in DEPTH_FIGURES.items():
        series = {run.name: s for run in runs if (s := run.depth_series(stat)) and (stat != "grad_norm" or run.stats)}
        if series:
            figures[stem] = plots.depth_heatmaps_figure(series, title, label, log_scale)
    scales = {run.name: profile for run in runs if (profile := norm_scales(run))}
    if scales:
        figures["norm_scales"] = plots.norm_scales_figure(
            scales, "Norm output RMS per layer and slot (last statistics step)")
    return figures


def compare_runs(run_dirs: list[str | os.PathLike], output_dir: str | os.PathLike,
                 names: list[str] | None = None) -> str:
    """Write ``comparison.md`` and the figures' PNGs to ``output_dir``; returns the Markdown."""
    names = names or [None] * len(run_dirs)
    runs = [load_run(path, name) for path, name in zip(run_dirs, names)]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(runs)
    (output_dir / "comparison.md").write_text(markdown)
    for stem, fig in comparison_figures(runs).items():
        plots.save(fig, output_dir / f"{stem}.png")
    return markdown
