"""``megamix plan``: what a config builds and what it costs per rank, without allocating it.

The per-rank shapes are real: for every (pipeline, tensor) rank the plan builds that rank's stage on
the meta device and applies the same tensor-parallel sharding the trainer applies, inside a fake
process group of the layout's world size, so the 7B plan runs on a laptop and cannot drift from the
trainer.  Memory is an estimate per rank: weights, gradients and Adam states under the ZeRO stage,
and activations of the micro-batches a pipeline schedule keeps in flight.

``megamix plan --world-size N`` lists every valid ``(tp, pp, dp)`` layout of N GPUs for the config
with the estimated memory per GPU (counting parameters per rank arithmetically; the tests check
that count against the real build).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megamix.config import Config, ConfigError, validate
from megamix.model import Transformer, layer_of, num_parameters
from megamix.parallel.mesh import ParallelMesh
from megamix.parallel.pipeline import keep_stage
from megamix.parallel.stages import stage_of_layers, stage_to_rank, stages_of_rank
from megamix.parallel.tensor_parallel import apply_tensor_parallel, is_tensor_parallel
from megamix.schemes import MIX, attention_norms, describe_schemes, layer_schemes, post_ln_layers

GiB = 2**30
TP_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
ATTENTION_NORMS = re.compile(r"^layers\.(\d+)\.attention\.([qkv]_norm)\.(weight|bias)$")


@dataclass
class RankParams:
    held: int  # parameters this rank stores before ZeRO sharding (norms replicated over tp)
    owned: int  # the same, counting replicated norms only on tp rank 0: sums to the total


# ----------------------------------------------------------------------------------------------
# Real per-rank shapes: the trainer's own stage split and tensor-parallel plan, on meta tensors.


@contextlib.contextmanager
def _fake_world(rank: int, world_size: int):
    """A process group whose collectives do nothing, to run the sharding code as one rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("megamix plan builds its own (fake) process group; run it outside torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_shapes(cfg: Config, full: Transformer, pp_rank: int, tp_rank: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (local shape, sharded over tp)}`` of every parameter pipeline rank ``pp_rank``,
    tensor rank ``tp_rank`` holds (before ZeRO divides them over ``dp``)."""
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    rank = pp_rank * p.tp + tp_rank  # dp rank 0: the mesh order is (pp, dp, tp)
    shapes = {}
    with _fake_world(rank, p.pp * p.tp):
        mesh = ParallelMesh(p.pp, 1, p.tp, "cpu")
        for stage in stages_of_rank(pp_rank, p.pp, p.virtual_stages):
            module = keep_stage(copy.deepcopy(full), stage, num_stages, p.stage_layers)
            if p.tp > 1:
                apply_tensor_parallel(module, mesh.tp_mesh, p.sequence_parallel)
            for name, param in module.named_parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                shapes[name] = (tuple(local.shape), is_tensor_parallel(param, mesh.tp_mesh))
    return shapes


def built_params_per_rank(cfg: Config, full: Transformer) -> tuple[dict, dict]:
    """Parameters per (pipeline rank, tensor rank) from the real sharded build, and the shapes."""
    out, shapes = {}, {}
    for pp_rank in range(cfg.parallel.pp):
        for tp_rank in range(cfg.parallel.tp):
            local = rank_shapes(cfg, full, pp_rank, tp_rank)
            held = sum(_numel(shape) for shape, _ in local.values())
            owned = sum(_numel(shape) for shape, sharded in local.values() if sharded or tp_rank == 0)
            out[(pp_rank, tp_rank)] = RankParams(held, owned)
            shapes[(pp_rank, tp_rank)] = local
    return out, shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# Arithmetic per-rank counts (fast; used to survey many layouts).


def params_per_rank(cfg: Config, model: Transformer) -> dict[tuple[int, int], RankParams]:
    """Parameters per (pipeline rank, tensor rank), by the Megatron plan's rules."""
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    layer_stage = stage_of_layers(cfg.model.num_layers, num_stages, p.stage_layers)
    out = {(pp, tp): RankParams(0, 0) for pp in range(p.pp) for tp in range(p.tp)}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        sharded = _tp_sharded(name, model)
        layer = layer_of(name)
        if layer is not None:
            stage = layer_stage[layer]
        elif name.startswith(("embed_tokens.", "embed_scale.", "embed_norm.")):
            stage = 0
        else:  # final norm and head
            stage = num_stages - 1
        pp_rank = stage_to_rank(stage, p.pp)
        for tp_rank in range(p.tp):
            share = param.numel() // p.tp if sharded else param.numel()
            out[(pp_rank, tp_rank)].held += share
            out[(pp_rank, tp_rank)].owned += share if sharded or tp_rank == 0 else 0
    return out


def _tp_sharded(name: str, model: Transformer) -> bool:
    """Whether tensor parallelism splits the parameter ``name``: the projections, embedding and head,
    and the weight and bias of a norm over a whole q, k or v projection (``full``)."""
    if any(f"{k}." in name for k in TP_SHARDED):
        return True
    match = ATTENTION_NORMS.match(name)
    return match is not None and model.layers[match.group(1)].attention.forms[match.group(2)] == "full"


# ----------------------------------------------------------------------------------------------
# Memory.


def activation_bytes(cfg: Config, pp_rank: int, layers_on_rank: int, has_head: bool) -> float:
    """Activations a rank keeps for backward at its peak, per the pipeline schedule."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype_bytes = 2 if t.precision in ("bf16", "bf16_pure") else 4
    tokens = t.micro_batch_size * cfg.data.seq_len
    kv = m.kv_heads * m.head_dim
    # Saved per token per layer: block input, norm outputs, q/k/v and their rotated copies,
    # attention output, the mid-block residual, and the four SwiGLU intermediates.
    per_layer = (7 * m.hidden_size + 3 * kv + 4 * m.intermediate_size) / p.tp * tokens * dtype_bytes
    if p.activation_checkpoint == "full":
        block_input = m.hidden_size / (p.tp if p.sequence_parallel else 1) * tokens * dtype_bytes
        stored = layers_on_rank * block_input + per_layer
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
    """Estimated peak bytes per rank by component (GiB), with FSDP2's semantics.

    fp32 master weights, gradients and Adam's two moments (bf16 ones under ``bf16_pure``) are
    divided over ``dp`` by ZeRO 2 and 3.
    Compute copies come on top: under ZeRO 2 every block stays gathered from its forward to its
    backward (the whole stage at the end of the forward), under ZeRO 3 only the block running (and
    the next, prefetched); without sharding, bf16 copies are made by autocast for the whole stage.
    """
    p, t = cfg.parallel, cfg.train
    if p.engine == "deepspeed":
        return deepspeed_memory(cfg, held, layers_on_rank, activation_bytes(cfg, pp_rank, layers_on_rank, has_head))
    dp = p.dp or 1
    compute_bytes = 2 if t.precision in ("bf16", "bf16_pure") else 4
    stored = 2 if t.precision == "bf16_pure" else 4  # bf16_pure: bf16 weights, gradients and Adam states
    sharded = p.zero >= 2 and dp > 1
    master = held * stored / (dp if sharded else 1)
    if not sharded:
        gathered = held * 2 if t.precision == "bf16" else 0
    elif p.zero == 2:
        gathered = held * compute_bytes
    else:
        gathered = held * compute_bytes * min(1.0, 2 / max(1, layers_on_rank))
    grads = held * stored / (dp if sharded else 1)
    optim = held * 2 * stored / (dp if sharded else 1)
    act = activation_bytes(cfg, pp_rank, layers_on_rank, has_head)
    parts = {"weights": master + gathered, "grads": grads, "optimizer": optim, "activations": act}
    parts["total"] = sum(parts.values())
    return {k: v / GiB for k, v in parts.items()}


def deepspeed_memory(cfg: Config, held: int, layers_on_rank: int, activations: float) -> dict[str, float]:
    """Estimated peak bytes per rank (GiB) under DeepSpeed (``parallel.engine: deepspeed``).

    The model's parameters stay fp32 (bf16 is the trainer's autocast) and ZeRO keeps its own fp32
    master partition beside them.  ZeRO-1 divides the master copy and Adam's moments over ``dp``,
    ZeRO-2 also the gradients, ZeRO-3 also the parameters (gathered a block or two at a time).
    Offload moves the master copy, the moments and the fp32 gradient partition (under ZeRO-3 also
    the parameter partitions) off the accelerator: into ``host`` memory, or ``nvme``; ``total``
    counts the accelerator only.
    """
    p = cfg.parallel
    dp = p.dp or 1
    params = held * 4 / (dp if p.zero == 3 else 1)
    gathered = held * 4 * min(1.0, 2 / max(1, layers_on_rank)) if p.zero == 3 else 0.0
    master, optim = held * 4 / dp, held * 8 / dp
    grads = held * 4 / (dp if p.zero >= 2 else 1)
    off = 0.0
    if p.offload != "none":
        off, master, optim = master + optim + held * 4 / dp, 0.0, 0.0
        if p.zero == 3:
            off, params = off + params, 0.0
    parts = {"weights": params + gathered + master, "grads": grads, "optimizer": optim, "activations": activations}
    parts["total"] = sum(parts.values())
    parts["host"] = off if p.offload == "cpu" else 0.0
    parts["nvme"] = off if p.offload == "nvme" else 0.0
    return {k: v / GiB for k, v in parts.items()}


def _rank_rows(cfg: Config, per_rank: dict[tuple[int, int], RankParams]) -> list[dict]:
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    layer_stage = stage_of_layers(cfg.model.num_layers, num_stages, p.stage_layers)
    rows = []
    for (pp_rank, tp_rank), counts in sorted(per_rank.items()):
        layers = [i for i, s in enumerate(layer_stage) if stage_to_rank(s, p.pp) == pp_rank]
        has_head = stage_to_rank(num_stages - 1, p.pp) == pp_rank
        rows.append({
            "pp_rank": pp_rank,
            "tp_rank": tp_rank,
            "layers": layers,
            "params": counts.held,
            "params_owned": counts.owned,
            "memory_gib": memory_per_rank(cfg, counts.held, pp_rank, len(layers), has_head),
        })
    return rows


# ----------------------------------------------------------------------------------------------
# The plan of one layout, and the survey of layouts.


def _layout_world(cfg: Config) -> int:
    p = cfg.parallel
    return p.tp * p.pp * (p.dp or 1)


def make_plan(cfg: Config) -> dict:
    """Everything ``megamix plan`` prints, as a JSON-ready dict."""
    validate(cfg, world_size=_layout_world(cfg))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    p = cfg.parallel
    num_stages = p.pp * p.virtual_stages
    layer_stage = stage_of_layers(cfg.model.num_layers, num_stages, p.stage_layers)
    per_rank, shapes = built_params_per_rank(cfg, model)
    ranks = _rank_rows(cfg, per_rank)
    for row in ranks:
        local = shapes[(row["pp_rank"], row["tp_rank"])]
        row["shapes"] = {name: list(shape) for name, (shape, _) in local.items()}
    return {
        "layers": [
            {"index": i, "norm": scheme, "qk_norm": attention_norms(cfg.norm, scheme)[0],
             "v_norm": attention_norms(cfg.norm, scheme)[1], "stage": layer_stage[i],
             "pp_rank": stage_to_rank(layer_stage[i], p.pp)}
            for i, scheme in enumerate(model.schemes)
        ],
        "norm": norm_summary(cfg),
        "params_total": num_parameters(model),
        "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp or 1, "zero": p.zero, "engine": p.engine,
                   "virtual_stages": p.virtual_stages, "schedule": p.schedule,
                   "sequence_parallel": p.sequence_parallel,
                   "activation_checkpoint": p.activation_checkpoint, "precision": cfg.train.precision},
        "ranks": ranks,
    }


def norm_summary(cfg: Config) -> dict:
    """The resolved norm settings: the type, the per-layer schemes run-length encoded, Mix-LN's
    count of Post-LN layers (and where it came from), the embedding norm, DyT's α0."""
    n, num_layers = cfg.norm, cfg.model.num_layers
    summary: dict = {"type": n.type, "schemes": describe_schemes(layer_schemes(n, num_layers)),
                     "embedding_norm": n.embedding_norm}
    if n.layers is None and n.scheme == MIX:
        summary["post_ln_layers"] = post_ln_layers(n, num_layers)
        summary["post_ln_from"] = f"post_layers={n.post_layers}" if n.post_layers is not None else f"alpha={n.alpha}"
    if n.type == "dyt":
        summary["dyt_alpha"] = {"attention": n.dyt_alpha_attention, "other": n.dyt_alpha_other}
    return summary


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def survey_layouts(cfg: Config, world_size: int) -> list[dict]:
    """Every valid ``(tp, pp, dp)`` of ``world_size`` GPUs for ``cfg`` (its other parallel settings
    kept), with the estimated memory of the fullest GPU; sorted by that memory."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    layouts = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            trial = copy.deepcopy(cfg)
            trial.parallel.tp, trial.parallel.pp, trial.parallel.dp = tp, pp, None
            trial.parallel.stage_layers = None
            if pp == 1 or trial.parallel.schedule not in ("interleaved_1f1b", "zero_bubble"):
                trial.parallel.virtual_stages = 1
            try:
                validate(trial, world_size=world_size)
            except ConfigError as e:
                layouts.append({"tp": tp, "pp": pp, "dp": world_size // (tp * pp), "valid": False, "reason": str(e)})
                continue
            rows = _rank_rows(trial, params_per_rank(trial, model))
            peak = max(rows, key=lambda r: r["memory_gib"]["total"])
            layouts.append({"tp": tp, "pp": pp, "dp": trial.parallel.dp, "valid": True,
                            "params_per_gpu": max(r["params"] for r in rows), "memory_gib": peak["memory_gib"]})
    return sorted(layouts, key=lambda r: (not r["valid"], r.get("memory_gib", {}).get("total", 0.0)))


# ----------------------------------------------------------------------------------------------
# Text output.


def _shape_table(shapes: dict[str, list[int]]) -> list[str]:
    """Local shapes with the layer index folded: one line per distinct (name, shape)."""
    groups: dict[tuple[str, tuple], list[int]] = {}
    for name, shape in shapes.items():
        match = re.match(r"layers\.(\d+)\.(.*)", name)
        key = ("layers.{}." + match.group(2), tuple(shape)) if match else (name, tuple(shape))
        groups.setdefault(key, []).append(int(match.group(1)) if match else -1)
    lines = []
    for (name, shape), layers in groups.items():
        label = name.format(f"{min(layers)}-{max(layers)}" if len(layers) > 1 else layers[0]) if "{}" in name else name
        lines.append(f"  {label:<48} {'×'.join(map(str, shape))}")
    return lines


def _format_norm(norm: dict, num_layers: int) -> str:
    text = f"norm: {norm['type']}, {norm['schemes']}"
    if "post_ln_layers" in norm:
        text += f" (Mix-LN: {norm['post_ln_layers']} of {num_layers} layers Post-LN, from {norm['post_ln_from']})"
    if norm["embedding_norm"]:
        text += ", embedding norm"
    if "dyt_alpha" in norm:
        text += f", DyT alpha0 {norm['dyt_alpha']['attention']} (attention) / {norm['dyt_alpha']['other']} (other)"
    return text


def format_plan(plan: dict) -> str:
    attention_norms = any(row["qk_norm"] != "none" or row["v_norm"] != "none" for row in plan["layers"])
    lines = [f"parameters: {plan['params_total']:,}", _format_norm(plan["norm"], len(plan["layers"])), "",
             "layer  norm          stage  pp rank" + ("  qk_norm   v_norm" if attention_norms else "")]
    for row in plan["layers"]:
        extra = f"  {row['qk_norm']:<8}  {row['v_norm']}" if attention_norms else ""
        lines.append(f"{row['index']:>5}  {row['norm']:<12}  {row['stage']:>5}  {row['pp_rank']:>7}{extra}")
    lay = plan["layout"]
    sp = ", sequence parallel" if lay["sequence_parallel"] and lay["tp"] > 1 else ""
    lines += ["", f"layout: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} zero={lay['zero']} ({lay['engine']}){sp}, "
              f"{lay['precision']}, activation checkpoint {lay['activation_checkpoint']}", "",
              "pp  tp  layers      params/rank   weights  grads  optim  activ.  total GiB"]
    for r in plan["ranks"]:
        m = r["memory_gib"]
        span = f"{r['layers'][0]}-{r['layers'][-1]}" if r["layers"] else "-"
        lines.append(
            f"{r['pp_rank']:>2}  {r['tp_rank']:>2}  {span:<10}  {r['params']:>13,}  {m['weights']:7.2f}  "
            f"{m['grads']:5.2f}  {m['optimizer']:5.2f}  {m['activations']:6.2f}  {m['total']:9.2f}"
        )
    owned = sum(r["params_owned"] for r in plan["ranks"])
    lines.append(f"per-rank parameters, norms counted once per tensor-parallel group: {owned:,}")
    for where in ("host", "nvme"):
        offloaded = max(r["memory_gib"].get(where, 0.0) for r in plan["ranks"])
        if offloaded:
            lines.append(f"offloaded by DeepSpeed to {where} per rank (not in total): {offloaded:.2f} GiB")
    dp_note = f", each divided over dp={lay['dp']} by ZeRO-3" if lay["zero"] >= 3 and lay["dp"] > 1 else ""
    for r in plan["ranks"]:
        if r["tp_rank"] == 0:
            lines += ["", f"shapes on pipeline rank {r['pp_rank']}, tensor rank 0{dp_note}:"]
            lines += _shape_table(r["shapes"])
    return "\n".join(lines)


def format_survey(layouts: list[dict], world_size: int) -> str:
    lines = [f"layouts of {world_size} GPUs (memory of the fullest GPU, estimated)", "",
             "  tp  pp  dp   params/GPU      weights  grads  optim  activ.  total GiB"]
    for r in layouts:
        if r["valid"]:
            m = r["memory_gib"]
            lines.append(f"  {r['tp']:>2}  {r['pp']:>2}  {r['dp']:>2}  {r['params_per_gpu']:>13,}  "
                         f"{m['weights']:9.2f}  {m['grads']:5.2f}  {m['optimizer']:5.2f}  {m['activations']:6.2f}  "
                         f"{m['total']:9.2f}")
    invalid = [r for r in layouts if not r["valid"]]
    if invalid:
        lines += ["", "not possible:"]
        lines += [f"  tp={r['tp']} pp={r['pp']} dp={r['dp']}: {r['reason']}" for r in invalid]
    return "\n".join(lines)
