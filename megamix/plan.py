"""``megamix plan``: what a config builds and what it costs per rank, without allocating it.

The model is built on the meta device, so the 7B plan runs on a laptop.  Per-rank parameter
counts follow the Megatron sharding plan (q/k/v/gate/up column-wise and o/down row-wise over
``tp``, embedding and head vocab-parallel, norms replicated) and the pipeline split.  Memory is an
estimate per rank: weights, gradients and Adam states under the ZeRO stage, and activations of
the micro-batches a pipeline schedule keeps in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamix.config import Config
from megamix.model import Transformer, num_parameters
from megamix.parallel.stages import stage_of_layers, stage_to_rank

GiB = 2**30
TP_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")


@dataclass
class RankParams:
    held: int  # parameters this rank stores before ZeRO sharding (norms replicated over tp)
    owned: int  # the same, counting replicated norms only on tp rank 0: sums to the total


def _module_params(model: Transformer) -> list[tuple[str, int, bool]]:
    """(name, numel, sharded over tp) for every distinct parameter."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p.numel(), any(f"{k}." in name for k in TP_SHARDED)))
    return out


def params_per_rank(cfg: Config, model: Transformer) -> dict[tuple[int, int], RankParams]:
    """Parameters per (pipeline rank, tensor rank)."""
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    layer_stage = stage_of_layers(cfg.model.num_layers, num_stages, p.stage_layers)
    out = {(pp, tp): RankParams(0, 0) for pp in range(p.pp) for tp in range(p.tp)}
    for name, numel, sharded in _module_params(model):
        if name.startswith("layers."):
            stage = layer_stage[int(name.split(".")[1])]
        elif name.startswith("embed_tokens"):
            stage = 0
        else:  # final norm and head
            stage = num_stages - 1
        pp_rank = stage_to_rank(stage, p.pp)
        for tp_rank in range(p.tp):
            share = numel // p.tp if sharded else numel
            out[(pp_rank, tp_rank)].held += share
            out[(pp_rank, tp_rank)].owned += share if sharded or tp_rank == 0 else 0
    return out


def activation_bytes(cfg: Config, pp_rank: int, layers_on_rank: int, has_head: bool) -> float:
    """Activations a rank keeps for backward at its peak, per the pipeline schedule."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype_bytes = 2 if t.precision == "bf16" else 4
    tokens = t.micro_batch_size * cfg.data.seq_len
    kv = m.kv_heads * m.head_dim
    # Saved per token per layer: block input, norm outputs, q/k/v and their rotated copies,
    # attention output, the mid-block residual, and the four SwiGLU intermediates.
    per_layer = (7 * m.hidden_size + 3 * kv + 4 * m.intermediate_size) / p.tp * tokens * dtype_bytes
    if p.activation_checkpoint == "full":
        block_inputs = layers_on_rank * m.hidden_size / (p.tp if p.sequence_parallel else 1) * tokens * dtype_bytes
        stored = block_inputs + per_layer  # the saved inputs, and one layer recomputed at a time
    elif p.activation_checkpoint == "selective":
        stored = (layers_on_rank / 2) * per_layer + per_layer
    else:
        stored = layers_on_rank * per_layer
    num_micro = t.global_batch_size // (t.micro_batch_size * (p.dp or 1))
    in_flight = num_micro if p.schedule == "gpipe" else min(num_micro, p.pp - pp_rank)
    total = stored * max(1, in_flight)
    if has_head:  # logits in fp32 for the loss, and their gradient
        total += 2 * tokens * m.vocab_size / p.tp * 4
    return total


def memory_per_rank(cfg: Config, held: int, pp_rank: int, layers_on_rank: int, has_head: bool) -> dict[str, float]:
    """Estimated bytes per rank by component (GiB)."""
    p, t = cfg.parallel, cfg.train
    dp = p.dp or 1
    mixed = t.precision == "bf16"
    weights = held * 4 + (held * 2 if mixed else 0)  # fp32 master (+ bf16 compute copy)
    grads = held * 4
    optim = held * 8  # Adam's two fp32 moments
    if p.zero >= 1:
        optim /= dp
    if p.zero >= 2:
        grads /= dp
    if p.zero >= 3:
        weights /= dp
    act = activation_bytes(cfg, pp_rank, layers_on_rank, has_head)
    parts = {"weights": weights, "grads": grads, "optimizer": optim, "activations": act}
    parts["total"] = sum(parts.values())
    return {k: v / GiB for k, v in parts.items()}


def make_plan(cfg: Config) -> dict:
    """Everything ``megamix plan`` prints, as a JSON-ready dict."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    layer_stage = stage_of_layers(cfg.model.num_layers, num_stages, p.stage_layers)
    per_rank = params_per_rank(cfg, model)
    ranks = []
    for (pp_rank, tp_rank), counts in sorted(per_rank.items()):
        layers = [i for i, s in enumerate(layer_stage) if stage_to_rank(s, p.pp) == pp_rank]
        has_head = stage_to_rank(num_stages - 1, p.pp) == pp_rank
        ranks.append({
            "pp_rank": pp_rank,
            "tp_rank": tp_rank,
            "layers": layers,
            "params": counts.held,
            "params_owned": counts.owned,
            "memory_gib": memory_per_rank(cfg, counts.held, pp_rank, len(layers), has_head),
        })
    return {
        "layers": [
            {"index": i, "norm": kind, "stage": layer_stage[i], "pp_rank": stage_to_rank(layer_stage[i], p.pp)}
            for i, kind in enumerate(model.placements)
        ],
        "params_total": num_parameters(model),
        "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp or 1, "zero": p.zero, "engine": p.engine,
                   "virtual_stages": p.virtual_stages, "schedule": p.schedule,
                   "activation_checkpoint": p.activation_checkpoint, "precision": cfg.train.precision},
        "ranks": ranks,
    }


def format_plan(plan: dict) -> str:
    lines = [f"parameters: {plan['params_total']:,}", "", "layer  norm      stage  pp rank"]
    for row in plan["layers"]:
        lines.append(f"{row['index']:>5}  {row['norm']:<8}  {row['stage']:>5}  {row['pp_rank']:>7}")
    lay = plan["layout"]
    lines += ["", f"layout: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} zero={lay['zero']} ({lay['engine']}), "
              f"{lay['precision']}, activation checkpoint {lay['activation_checkpoint']}", "",
              "pp  tp  layers      params/rank   weights  grads  optim  activ.  total GiB"]
    for r in plan["ranks"]:
        m = r["memory_gib"]
        span = f"{r['layers'][0]}-{r['layers'][-1]}" if r["layers"] else "-"
        lines.append(
            f"{r['pp_rank']:>2}  {r['tp_rank']:>2}  {span:<10}  {r['params']:>13,}  {m['weights']:7.2f}  "
            f"{m['grads']:5.2f}  {m['optimizer']:5.2f}  {m['activations']:6.2f}  {m['total']:9.2f}"
        )
    return "\n".join(lines)
