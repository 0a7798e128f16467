"""Depth statistics while training: what happens inside the network, layer by layer, as it learns.

Every ``train.stats_interval`` steps, on a fixed probe batch (the first ``train.stats_probe_sequences``
sequences of the validation data, the same at every step and on every layout), one extra forward
without gradients measures, per layer ℓ (global index, keys ``layer_ℓℓ``):

- ``stats/rms/layer_ℓℓ``: the RMS of the residual stream after the layer, √(mean x²), over every
  token and hidden unit of the probe (what the Curse of Depth paper sees grow with depth under Pre-LN);
- ``stats/var/layer_ℓℓ``: the stream's variance across the hidden units, averaged over tokens;
- ``stats/angular/layer_ℓℓ``: the angular distance arccos(cos(x_ℓ, x_ℓ+1))/π between the layer's input
  and output stream, averaged over every token of the probe (Mix-LN's measure of how much a layer
  still changes the hidden state; the checkpoint analysis defaults to the last token instead);
- ``stats/norm_out/layer_ℓℓ/<sublayer>_<slot>``: the RMS of each norm's output, per sublayer
  (``attention``, ``mlp``) and slot (``before`` the sublayer, on its ``output``, ``after`` the
  residual add; :data:`megamix.schemes.SLOTS`): the scale the norm hands on, including LayerNorm
  Scaling's 1/√(ℓ+1); and ``attention_q``, ``attention_k``, ``attention_v`` for the norms on q, k
  and v (QK-norm, V-norm), over every head;
- ``stats/attn_logit_max/layer_ℓℓ``: the largest attention logit q·k/√d over every head and causal
  (query, key) pair of the probe — the growth QK-norm exists to stop;
- ``stats/attn_entropy/layer_ℓℓ``: the entropy (nats) of the attention distribution, averaged over
  heads and query positions — its collapse is the other classic sign of attention going unstable;
- ``stats/update_ratio/layer_ℓℓ``: ‖ΔW‖/‖W‖ of the layer's parameters over this step's optimizer
  update (W before the update), from the engine's optimizer hooks.

Why the losses stay bit-identical with statistics on and off: the probe forward runs under
``no_grad`` on tokens read once at start-up (no data loader, no RNG), after the step's update and
before the next step, and only reads the stream through forward hooks; the update ratio reads the
weights before and after the update and copies nothing back.

Why any layout gives the one-process numbers: each statistic is a sum (of squares, of per-token
variances and distances, of counts) that every rank accumulates for the layers and tokens it sees,
in one ``[layers, fields]`` float64 table that one all-reduce adds up over the world.  Pipeline
stages fill disjoint layers; tensor-parallel ranks see the whole stream (one of them counts) or,
under sequence parallelism, their own slice of the tokens (all count); data-parallel replicas run the
same probe (one counts) — :attr:`Engine.probe_share`.  The norms on q, k and v see every token
and the heads a rank holds: tensor ranks hold disjoint heads, so each counts, and data-parallel
replicas count once (:attr:`Engine.probe_heads_count`); so does the attention entropy.  The largest
logit is a maximum, not a sum: one all-reduce of the maxima, which any number of replicas leaves
alone.  The update ratio's squares are divided by how many ranks hold each element, as the gradient
norms' are (:mod:`megamix.parallel.grad_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from megamix.model import Block, layer_of
from megamix.schemes import SLOTS, SUBLAYERS
from megamix.train.engines import Engine, StepStats

# Columns of the per-layer table.
SUMSQ, ELEMENTS, VAR, ANGULAR, TOKENS, UPDATE_SQ, WEIGHT_SQ = range(7)
# The norms a statistic names: the blocks' (sublayer, slot) and attention's on q, k and v.
NORM_SLOTS = [(sublayer, slot) for sublayer in SUBLAYERS for slot in SLOTS]
HEAD_NORMS = ["q_norm", "k_norm", "v_norm"]
NORM_KEYS = [f"{sublayer}_{slot}" for sublayer, slot in NORM_SLOTS] + [f"attention_{n[0]}" for n in HEAD_NORMS]
NORM_BASE = 7  # then (sum of squares, elements) per norm key
HEADS_BASE = NORM_BASE + 2 * len(NORM_SLOTS)  # from here on, sums over attention heads: the q, k, v norms' ...
ENTROPY, ATTENTION_ROWS = NORM_BASE + 2 * len(NORM_KEYS), NORM_BASE + 2 * len(NORM_KEYS) + 1  # ... and attention's
COLUMNS = ATTENTION_ROWS + 1
STAT_NAMES = ("rms", "var", "angular", "update_ratio", "norm_out", "attn_logit_max", "attn_entropy")
LOGITS_PER_CHUNK = 1 << 22  # attention logits computed at a time by the probe (16 MB in fp32)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / π row by row, in float64 and clamped (as
    :func:`megamix.analysis.angular.angular_distance`, which this layer cannot import)."""
    cos = (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _square_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² in float64, from a float32-accumulated norm (no squared or float64 copy of ``t``)."""
    return torch.linalg.vector_norm(t, dtype=torch.float32).double().square()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a stream tensor (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def stat_key(stat: str, layer: int, norm: str | None = None) -> str:
    """``stats/rms/layer_03``, ``stats/norm_out/layer_03/attention_before``."""
    return f"stats/{stat}/layer_{layer:02d}" + (f"/{norm}" if norm else "")


@contextmanager
def eager(blocks: list[nn.Module]):
    """Run compiled blocks eagerly for a moment (``train.compile``): the probe's hooks and its
    ``no_grad`` mode then never reach the compiled graphs, which stay as they were."""
    saved = [(b, b._compiled_call_impl) for b in blocks if getattr(b, "_compiled_call_impl", None) is not None]
    for block, _ in saved:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, compiled in saved:
            block._compiled_call_impl = compiled


class DepthStats:
    """The probe and the update ratios of one run (see the module docstring).

    :meth:`arm` before a statistics step's optimizer update; :meth:`measure` after it (a
    collective: every rank calls it) returns the record's ``stats/...`` values.
    """

    def __init__(self, engine: Engine, num_layers: int, probe: torch.Tensor):
        self.engine, self.num_layers = engine, num_layers
        self.tokens = probe[:, :-1].contiguous()  # [sequences, seq_len]
        self.table = torch.zeros(num_layers, COLUMNS, dtype=torch.float64, device=engine.device)
        self.logit_max = torch.full((num_layers,), -math.inf, dtype=torch.float64, device=engine.device)
        self.armed = False
        self.before: dict[str, torch.Tensor] | None = None
        engine.before_optimizer_step.append(self._snapshot)
        engine.after_optimizer_step.append(self._update_ratios)

    # -- update-to-weight ratios --------------------------------------------------------------
    def arm(self) -> None:
        """Measure the next optimizer update."""
        self.armed = True

    def _snapshot(self, engine: Engine) -> None:
        if self.armed:
            self.before = {name: t.clone() for name, t, _ in engine.parameter_shards() if layer_of(name) is not None}

    @torch.no_grad()
    def _update_ratios(self, engine: Engine, stats: StepStats) -> None:
        if self.before is None:
            return
        for name, now, copies in engine.parameter_shards():
            before = self.before.get(name)
            if before is None:
                continue
            row = self.table[layer_of(name)]
            row[UPDATE_SQ] += _square_norm(now.float() - before.float()) / copies
            row[WEIGHT_SQ] += _square_norm(before) / copies
        self.before, self.armed = None, False

    # -- the probe ----------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """Run the probe, add everything up over the world, and return the statistics."""
        counts, _ = self.engine.probe_share
        heads_count = self.engine.probe_heads_count
        blocks = {int(index): block for index, block in self.engine.model.layers.items()}
        probe = torch.zeros_like(self.table)
        with ExitStack() as stack:
            for index, block in blocks.items():
                handle = block.register_forward_hook(self._stream_hook(probe[index]))
                stack.callback(handle.remove)
                for column, norm in self._norms(block):
                    stack.enter_context(_recording(norm, probe[index], column))
                stack.enter_context(_watching(block.attention, probe[index], self.logit_max[index:index + 1]))
            stack.enter_context(eager(list(blocks.values())))
            self.engine.forward_only(self.tokens)
        if counts:
            self.table[:, :HEADS_BASE] += probe[:, :HEADS_BASE]
        if heads_count:
            self.table[:, HEADS_BASE:] += probe[:, HEADS_BASE:]
        table = self.engine.reduce_sum(self.table).to("cpu", copy=True)
        logit_max = self.engine.reduce_max(self.logit_max).to("cpu", copy=True)
        self.table.zero_()
        self.logit_max.fill_(-math.inf)
        return self.values(table, logit_max)

    def _norms(self, block: Block) -> list[tuple[int, nn.Module]]:
        """``(table column, norm module)`` for each norm of a block: by (sublayer, slot), then those
        on attention's q, k and v."""
        found = []
        for sublayer, names in block.norm_names.items():
            for slot, name in zip(SLOTS, names):
                if name:
                    found.append((NORM_BASE + 2 * NORM_SLOTS.index((sublayer, slot)), getattr(block, name)))
        for i, name in enumerate(HEAD_NORMS):
            norm = getattr(block.attention, name, None)
            if norm is not None:
                found.append((HEADS_BASE + 2 * i, norm))
        return found

    @staticmethod
    def _stream_hook(row: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            x_in = _local(Block.stream(args[0], args[1])).double().flatten(0, -2)
            x_out = _local(Block.stream(*output)).double().flatten(0, -2)
            row[SUMSQ] += x_out.square().sum()
            row[ELEMENTS] += x_out.numel()
            row[VAR] += x_out.var(dim=-1, unbiased=False).sum()
            row[ANGULAR] += angular_distance(x_in, x_out).sum()
            row[TOKENS] += x_out.shape[0]

        return hook

    def values(self, table: torch.Tensor, logit_max: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer in range(self.num_layers):
            row = table[layer].tolist()
            if math.isfinite(logit_max[layer]):
                out[stat_key("attn_logit_max", layer)] = float(logit_max[layer])
            if row[ATTENTION_ROWS] > 0:
                out[stat_key("attn_entropy", layer)] = row[ENTROPY] / row[ATTENTION_ROWS]
            if row[ELEMENTS] > 0:
                out[stat_key("rms", layer)] = math.sqrt(row[SUMSQ] / row[ELEMENTS])
                out[stat_key("var", layer)] = row[VAR] / row[TOKENS]
                out[stat_key("angular", layer)] = row[ANGULAR] / row[TOKENS]
            if row[WEIGHT_SQ] > 0:
                out[stat_key("update_ratio", layer)] = math.sqrt(row[UPDATE_SQ] / row[WEIGHT_SQ])
            for i, key in enumerate(NORM_KEYS):
                sumsq, elements = row[NORM_BASE + 2 * i], row[NORM_BASE + 2 * i + 1]
                if elements > 0:
                    out[stat_key("norm_out", layer, key)] = math.sqrt(sumsq / elements)
        return out


@contextmanager
def _recording(norm: nn.Module, row: torch.Tensor, column: int):
    """While open, every output of ``norm`` (through :meth:`Norm.add_norm`, which the block and
    ``Norm.forward`` call) adds its sum of squares and element count to ``row[column:column+2]``;
    an instance attribute that shadows the method for the moment."""
    original = norm.add_norm

    def add_norm(*args, **kwargs):
        out = original(*args, **kwargs)
        y = _local(out[0]).double()
        row[column] += y.square().sum()
        row[column + 1] += y.numel()
        return out

    norm.add_norm = add_norm
    try:
        yield
    finally:
        del norm.add_norm


@contextmanager
def _watching(attention: nn.Module, row: torch.Tensor, logit_max: torch.Tensor):
    """While open, every call of ``attention.attend`` also measures its logits: the largest into
    ``logit_max`` (one element), the summed entropy of each head's attention rows and their count
    into ``row``; an instance attribute that shadows the method for the moment."""
    original = attention.attend

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        largest, entropy, rows = attention_logit_stats(_local(q), _local(k))
        logit_max.clamp_(min=largest)
        row[ENTROPY] += entropy
        row[ATTENTION_ROWS] += rows
        return original(q, k, v)

    attention.attend = attend
    try:
        yield
    finally:
        del attention.attend


def attention_logit_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float, int]:
    """Causal attention's logits q·k/√d for ``q`` ``[batch, heads, seq, d]`` and ``k`` (as many heads,
    or fewer: grouped-query): ``(largest logit, Σ entropy of the attention rows in nats, rows)``,
    every head at once for a chunk of query rows at a time, in fp32 (also under the run's autocast)."""
    with torch.autocast(q.device.type, enabled=False):
        return _logit_stats(q, k)


def _logit_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float, int]:
    batch, heads, seq, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1).float().transpose(-1, -2)  # [batch, heads, d, seq]
    chunk = max(1, LOGITS_PER_CHUNK // (batch * heads * seq))
    keys = torch.arange(seq, device=q.device)
    largest = torch.full((), -math.inf, device=q.device)
    entropy = torch.zeros((), dtype=torch.float64, device=q.device)
    for start in range(0, seq, chunk):
        queries = torch.arange(start, min(seq, start + chunk), device=q.device)
        logits = (q[:, :, start:start + chunk].float() @ k) * dim ** -0.5  # [batch, heads, rows, seq]
        logits = logits.masked_fill(keys > queries[:, None], -math.inf)  # a query sees itself and before
        largest = torch.maximum(largest, logits.amax())
        logp = logits.log_softmax(-1)
        entropy -= (logp.exp() * logp.masked_fill(logp == -math.inf, 0.0)).sum(dtype=torch.float64)
    return largest.item(), entropy.item(), batch * heads * seq


def summary_line(values: dict[str, float], num_layers: int) -> str:
    """``rms 1.02 → 7.9 | angular 0.31 → 0.04 | logit max 5.1 → 9.8 | update 2.1e-03 → 1.5e-03``
    (first → last layer)."""
    parts = []
    for stat, label, fmt in (("rms", "rms", ".3g"), ("angular", "angular", ".3f"),
                             ("attn_logit_max", "logit max", ".3g"), ("update_ratio", "update", ".2e")):
        first, last = values.get(stat_key(stat, 0)), values.get(stat_key(stat, num_layers - 1))
        if first is not None and last is not None:
            parts.append(f"{label} {first:{fmt}} → {last:{fmt}}")
    return " | ".join(parts)
