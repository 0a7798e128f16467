"""Layer-effectiveness analysis of one checkpoint, written as ``layers.json``, PNGs and TensorBoard.

Three per-layer measurements on the same validation sequences (docs/analysis.md defines
them): the angular distance between each layer's input and output (and across blocks of n
layers), the loss increase when the layer is removed, and the gradient norm of each layer's
parameters.  ``tools/analyze_layers.py`` is the command line; the norm study calls
:func:`analyze_checkpoint` and :func:`write_report` for every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from megamix.analysis import plots
from megamix.analysis.angular import AngularDistances
from megamix.analysis.grad_norms import checkpoint_grad_norms
from megamix.analysis.hidden_states import hidden_states
from megamix.analysis.pruning import layer_removal
from megamix.analysis.runs import scheme_label
from megamix.checkpoint import checkpoint_config, load_model, read_train_state, resolve_checkpoint
from megamix.data.gpt_dataset import build_dataset
from megamix.errors import MegamixError
from megamix.schemes import describe_schemes


class AnalysisError(MegamixError, ValueError):
    """A bad analysis request."""

TOKEN_DESCRIPTION = {"last": "last token of each sequence", "all": "mean over all tokens"}


def analyze_model(model: nn.Module, batches: list[torch.Tensor], grad_batches: int = 4, tokens: str = "last") -> dict:
    """The three per-layer measurements of ``model`` on ``batches`` (each ``[batch, seq + 1]`` ids);
    gradient norms use the first ``grad_batches`` batches."""
    distances = AngularDistances(len(model.layers), tokens)
    with torch.no_grad():
        for batch in batches:
            distances.update(hidden_states(model, batch[:, :-1]))
    return {
        "num_layers": len(model.layers),
        "schemes": [block.scheme for block in model.layers.values()],
        "angular_distance": {"tokens": tokens, "per_layer": distances.per_layer(), "blocks": distances.blocks()},
        "layer_removal": layer_removal(model, batches),
        "grad_norm": checkpoint_grad_norms(model, batches[:grad_batches]),
    }


def analyze_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    samples: int = 64,
    batch_size: int = 8,
    grad_batches: int = 4,
    tokens: str = "last",
    seq_len: int | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Analyze a checkpoint of any scheme and any parallel layout (or a run directory's latest).

    ``data`` is a ``.bin/.idx`` prefix read in order from its first sample; by default the run's own
    validation data.  The first ``samples`` sequences of ``seq_len`` tokens (default: the training
    length) are used.
    """
    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seq_len = seq_len or cfg.data.seq_len
    if seq_len > cfg.model.max_seq_len:
        raise AnalysisError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    if data is not None:
        dataset = build_dataset(data, "valid", "0,1", seq_len, cfg.data.seed, use_split=False)
    elif cfg.data.valid_path is not None:
        dataset = build_dataset(cfg.data.valid_path, "valid", "0,1", seq_len, cfg.data.seed, use_split=False)
    else:
        dataset = build_dataset(cfg.data.path, "valid", cfg.data.split, seq_len, cfg.data.seed)
    samples = min(samples, len(dataset))
    batches = [
        torch.stack([dataset[i] for i in range(start, min(start + batch_size, samples))]).to(device)
        for start in range(0, samples, batch_size)
    ]
    model = load_model(path, device=device)
    result = analyze_model(model, batches, grad_batches, tokens)
    return {
        "checkpoint": str(path),
        "step": read_train_state(path)["step"],
        "scheme": scheme_label(cfg.norm),
        "data": data or cfg.data.valid_path or cfg.data.path,
        "samples": samples,
        "seq_len": seq_len,
        "grad_batches": len(batches[:grad_batches]),
        **result,
    }


def default_output_dir(checkpoint: str | os.PathLike) -> Path:
    """``RUN/analysis`` for a checkpoint inside ``RUN/checkpoints/`` or for a run directory, where
    ``tools/compare_runs.py`` looks for it; ``CHECKPOINT/analysis`` otherwise."""
    path = resolve_checkpoint(checkpoint)
    return path.parent.parent / "analysis" if path.parent.name == "checkpoints" else path / "analysis"


def layer_table(result: dict) -> str:
    """One Markdown row per layer: scheme, angular distance, removal cost, gradient norm."""
    removal = result["layer_removal"]
    lines = [
        f"full model: val loss {removal['loss']:.4f}, ppl {removal['ppl']:.2f}  "
        f"({result['samples']} sequences of {result['seq_len']} tokens)",
        "",
        f"| layer | scheme | angular distance ({result['angular_distance']['tokens']} token) | "
        "loss without layer | loss increase | ppl without layer | grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (kind, distance, removed, grad) in enumerate(zip(
        result["schemes"], result["angular_distance"]["per_layer"], removal["layers"], result["grad_norm"]["mean"]
    )):
        lines.append(f"| {i} | {kind} | {distance:.4f} | {removed['loss']:.4f} | {removed['loss_increase']:+.4f} | "
                     f"{removed['ppl']:.2f} | {grad:.4g} |")
    return "\n".join(lines)


def report_figures(result: dict) -> dict:
    """The figures of one analysis, by file stem."""
    name = f"{result['scheme']} ({describe_schemes(result['schemes'])}), step {result['step']}"
    tokens = TOKEN_DESCRIPTION[result["angular_distance"]["tokens"]]
    return {
        "angular_distance": plots.per_layer_figure(
            {name: result["angular_distance"]["per_layer"]}, "angular distance d(x_ℓ, x_ℓ+1)",
            f"Angular distance per layer ({tokens})", bars=True),
        "angular_heatmap": plots.angular_heatmaps_figure(
            {name: result["angular_distance"]["blocks"]}, f"Angular distance across n layers ({tokens})"),
        "layer_removal": plots.per_layer_figure(
            {name: [r["loss_increase"] for r in result["layer_removal"]["layers"]]},
            "validation loss increase (nats)", "Performance drop when layer ℓ is removed", bars=True),
        "grad_norms": plots.per_layer_figure(
            {name: result["grad_norm"]["mean"]}, "gradient norm ‖∇W_ℓ‖",
            f"Gradient norm per layer (mean of {result['grad_batches']} validation batches)"),
    }


def write_report(result: dict, output_dir: str | os.PathLike, tensorboard: bool = True) -> list[Path]:
    """``layers.json``, ``layer_table.md`` and one PNG per figure in ``output_dir``; the figures and the
    table also go to ``output_dir/tensorboard`` at the checkpoint's step."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "layers.json").write_text(json.dumps(result, indent=1))
    table = layer_table(result)
    (output_dir / "layer_table.md").write_text(table + "\n")
    written = [output_dir / "layers.json", output_dir / "layer_table.md"]
    figures = report_figures(result)
    for stem, fig in figures.items():
        written.append(plots.save(fig, output_dir / f"{stem}.png"))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(output_dir / "tensorboard")) as writer:
            for stem, fig in figures.items():
                writer.add_figure(f"layers/{stem}", fig, global_step=result["step"], close=False)
            writer.add_text("layers/table", table, global_step=result["step"])
    return written
