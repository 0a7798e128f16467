"""What a finished run directory says about itself: its scheme, its curves, its final numbers.

A run directory (``train.output_dir``) holds ``config.yaml``, ``metrics.jsonl`` (training and
validation lines, and with the instruments on the depth statistics, downstream evals and instability
events: docs/instruments.md) and, once ``tools/analyze_layers.py`` has looked at it,
``analysis/layers.json``.  Comparisons and the norm
study read runs only through :func:`load_run`, so any run — from the study, from a cluster, from
last month — can be compared with any other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from megamix.config import Config, NormConfig, load_config
from megamix.errors import MegamixError
from megamix.schemes import MIX, layer_schemes


class RunDirError(MegamixError, FileNotFoundError):
    """A directory that is not a megamix run directory."""

LAYERS_JSON = Path("analysis") / "layers.json"


@dataclass
class Run:
    name: str
    path: Path
    config: Config
    schemes: list[str]  # per layer
    train: list[dict]  # training lines of metrics.jsonl, in order
    eval: list[dict]  # evaluation lines
    analysis: dict | None  # analysis/layers.json, if the run was analyzed
    stats: list[dict] = field(default_factory=list)  # depth-statistics lines (stats/...), in order
    downstream: list[dict] = field(default_factory=list)  # in-loop lm-eval lines (downstream/...)
    events: list[dict] = field(default_factory=list)  # instability flags and other events

    @property
    def scheme(self) -> str:
        return scheme_label(self.config.norm)

    @property
    def final_train_loss(self) -> float:
        return self.train[-1]["loss"] if self.train else math.nan

    @property
    def steps(self) -> int:
        return max((r["step"] for r in self.train + self.eval), default=0)

    @property
    def final_eval(self) -> dict:
        return self.eval[-1] if self.eval else {"step": 0, "val_loss": math.nan, "val_ppl": math.nan}

    def training_grad_norms(self) -> list[float] | None:
        """Each layer's gradient norm averaged over the logged training steps (None if not logged)."""
        keys = sorted(k for k in (self.train[-1] if self.train else {}) if k.startswith("grad_norm/layer_"))
        if not keys:
            return None
        lines = [r for r in self.train if all(k in r for k in keys)]
        return [sum(r[k] for r in lines) / len(lines) for k in keys]

    def depth_series(self, stat: str, suffix: str = "") -> tuple[list[int], list[list[float]]] | None:
        """``(steps, values[layer][step index])`` of a per-layer statistic over training: a depth
        statistic (``rms``, ``var``, ``angular``, ``update_ratio``, ``norm_out`` with a ``suffix``
        such as ``/attention_before``) or ``grad_norm`` (the logged per-layer gradient norms); NaN
        where a layer has no value (a norm slot a scheme lacks).  None when the run has none."""
        if stat == "grad_norm":
            lines, prefix = self.train, "grad_norm/layer_"
        else:
            lines, prefix = self.stats, f"stats/{stat}/layer_"
        keys = [f"{prefix}{layer:02d}{suffix}" for layer in range(self.config.model.num_layers)]
        lines = [r for r in lines if any(k in r for k in keys)]
        if not lines:
            return None
        grid = [[r.get(k, math.nan) for r in lines] for k in keys]
        return [r["step"] for r in lines], grid


def read_lines(path: str | os.PathLike) -> list[dict]:
    """Every line of a ``metrics.jsonl``; a line cut short by a crash is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a ``metrics.jsonl``."""
    return _split(read_lines(path))


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in records if "loss" in r and "val_loss" not in r], [r for r in records if "val_loss" in r]


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> Run:
    path = Path(run_dir)
    for required in ("config.yaml", "metrics.jsonl"):
        if not (path / required).is_file():
            raise RunDirError(f"{path}: no {required}; is this a megamix run directory?")
    config = load_config(path / "config.yaml")
    records = read_lines(path / "metrics.jsonl")
    train, evaluation = _split(records)
    analysis_file = path / LAYERS_JSON
    analysis = json.loads(analysis_file.read_text()) if analysis_file.is_file() else None
    return Run(
        name=name or path.name,
        path=path,
        config=config,
        schemes=layer_schemes(config.norm, config.model.num_layers),
        train=train,
        eval=evaluation,
        analysis=analysis,
        stats=[r for r in records if any(k.startswith("stats/") for k in r)],
        downstream=[r for r in records if any(k.startswith("downstream/") for k in r)],
        events=[r for r in records if "event" in r],
    )


def scheme_label(norm: NormConfig) -> str:
    """``pre``, ``mix α=0.25``, ``explicit`` (a per-layer list): how tables and legends name a scheme."""
    if norm.layers is not None:
        return "explicit"
    return f"mix α={norm.alpha:g}" if norm.scheme == MIX else norm.scheme

