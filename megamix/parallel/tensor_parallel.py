"""Megatron's tensor-parallel plan, applied to the plain model with DTensor.

Per block: q/k/v, gate and up are split column-wise (each rank computes its heads and its slice of
the MLP), o and down row-wise (the partial sums are all-reduced, or reduce-scattered over the
sequence under sequence parallelism).  The embedding and the LM head are split over the vocabulary,
and the loss is computed on vocab-sharded logits (:func:`vocab_parallel_cross_entropy`), so full
logits never exist on one rank.

Norms are not sharded: every norm placement (Pre-LN, Post-LN, Mix-LN, LNS, Peri-LN, DeepNorm) runs
its norms on plain local tensors between the parallel linears, so the fused add+norm kernel sees
ordinary tensors.  With ``sequence_parallel`` the residual stream between the linears is split over
the sequence: each rank normalizes its own tokens, attention and the MLP gather the sequence on
entry, and the norm weights' gradients, partial sums over each rank's tokens, are all-reduced by
:func:`reduce_sequence_parallel_grads`.

The norms inside attention (QK-norm, V-norm) see column-sharded projections: each rank holds its
heads.  A norm over each head (``per_head``) needs nothing in the forward; one over the whole
projection (``full``, OLMo 2) has its weight sharded like the columns and sums its statistics over
the tensor-parallel ranks (:func:`shard_attention_norms`).  Their replicated parameters (a per-head
norm's weight, DyT's α) get gradients from this rank's heads only: added up over the ranks in the
backward, or, under sequence parallelism, by :func:`reduce_sequence_parallel_grads` with the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from megamix.model import Transformer, lm_loss


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a whole model or a pipeline stage) over ``tp_mesh`` in place."""
    # The layout of the residual stream between the parallel regions.
    stream = Shard(1) if sequence_parallel else Replicate()
    if model.embed_tokens is not None:
        embedding = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        parallelize_module(model.embed_tokens, tp_mesh, embedding)
        model.embed_tokens.register_forward_hook(_completed)
    for block in model.layers.values():
        plan = {
            # One gather (or, without SP, one identity) feeds q/k/v: its backward sums their partial
            # input gradients with a single reduce-scatter (all-reduce).
            "attention": PrepareModuleInput(
                input_layouts=(stream, None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.q_proj": ColwiseParallel(),
            "attention.k_proj": ColwiseParallel(),
            "attention.v_proj": ColwiseParallel(),
            "attention.o_proj": RowwiseParallel(output_layouts=stream),
            "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        parallelize_module(block, tp_mesh, plan)
        shard_attention_norms(block.attention, tp_mesh, sequence_parallel)
        if sequence_parallel:
            block.attention.register_forward_pre_hook(_full_sequence_rope(model))
    if model.lm_head is not None:
        head = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=True)
        parallelize_module(model.lm_head, tp_mesh, head)


def _completed(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The embedding's output once its asynchronous all-reduce (reduce-scatter under sequence
    parallelism) has finished: a plain tensor, not torch's lazy ``AsyncCollectiveTensor``.  A block
    compiled by ``train.compile`` must not take that wrapper as its input: its gradient would reach
    the collective's backward as a plain tensor and fail.  (The copy is one [batch, seq, hidden].)"""
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of ``t`` over ``group``, out of place, with torch's functional collectives: what
    ``torch.compile`` traces faithfully inside a compiled block (torch 2.11 lost the in-place
    ``dist.all_reduce`` of a custom backward there, so the gradients came out unsummed)."""
    out = torch.ops._c10d_functional.all_reduce(t, "sum", group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward; the gradient, which each rank has only for its own use of
    the sum, is all-reduced in the backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_sum(grad, ctx.group), None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity in the forward, all-reduce of the gradient in the backward (Megatron's "copy to the
    tensor-parallel region"): a replicated parameter applied to this rank's share of the features."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_sum(grad, ctx.group), None


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward (Megatron's "reduce from the
    tensor-parallel region"): a sum every rank then uses alike, as a replicated loss does."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ColumnSplit:
    """A norm's features split over the tensor-parallel ranks like a column-sharded projection's
    (:class:`megamix.model.norms.FeatureSplit`)."""

    def __init__(self, group: dist.ProcessGroup, stats_span_ranks: bool, sum_replicated_grads: bool):
        self.group = group
        self.stats_span_ranks = stats_span_ranks  # a norm over the whole projection
        self.sum_replicated_grads = sum_replicated_grads  # else reduce_sequence_parallel_grads does it

    def local(self, param: torch.Tensor) -> torch.Tensor:
        if isinstance(param, DTensor):  # sharded like the columns: this rank's shard, its gradient complete
            return param.to_local()
        return _SumGradOverRanks.apply(param, self.group) if self.sum_replicated_grads else param

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(t, self.group)


def shard_attention_norms(attention: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """The norms on q, k and v of a tensor-parallel attention: a ``full`` norm's weight and bias are
    split like the projection's columns (``Shard(0)``) and its statistics summed over the ranks; a
    ``per_head`` norm (heads are split evenly) stays replicated and local."""
    for name, form in attention.forms.items():
        if form == "none":
            continue
        norm = getattr(attention, name)
        if form == "full":
            for pname in ("weight", "bias"):
                param = getattr(norm, pname)
                if param is not None:
                    norm.register_parameter(pname, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(0)])))
        norm.split = ColumnSplit(tp_mesh.get_group(), stats_span_ranks=form == "full",
                                 sum_replicated_grads=not sequence_parallel)


def _full_sequence_rope(model: Transformer):
    """Under sequence parallelism the model computes rotary tables for its local slice of the
    sequence; attention sees the whole sequence, so hand it tables of the full length."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, cos, sin = args
        seq = x.shape[1]  # x is the gathered (replicated) DTensor: its shape is global
        return x, model.rope_cos[:seq].to(cos.dtype), model.rope_sin[:seq].to(sin.dtype)

    return hook


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, targets: torch.Tensor, tp_mesh: DeviceMesh
) -> torch.Tensor:
    """Mean cross-entropy of logits split over the vocabulary (``[batch, seq, vocab / tp]`` per
    rank) without gathering them: torch's ``loss_parallel`` reduces the max, the sum of exponentials
    and the target logits across ranks.  Call it, and the ``backward`` of its result, inside
    ``torch.distributed.tensor.parallel.loss_parallel()``."""
    logits = DTensor.from_local(local_logits, tp_mesh, [Shard(-1)], run_check=False)
    return lm_loss(logits, targets).to_local()


def vocab_parallel_log_z_squared(local_logits: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """:func:`megamix.model.loss.log_z_squared` of logits split over the vocabulary, without
    gathering them: the largest logit (a constant shift, no gradient) and the sum of exponentials
    below it are reduced over the ranks; every rank then holds the same replicated value, whose
    gradient reaches each rank's own vocabulary shard."""
    group = tp_mesh.get_group()
    x = local_logits.float()
    shift = x.detach().amax(-1, keepdim=True)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    total = _SumForward.apply((x - shift).exp().sum(-1, keepdim=True), group)
    return (shift + total.log()).squeeze(-1).square().mean()


def is_tensor_parallel(param: torch.Tensor, tp_mesh: DeviceMesh) -> bool:
    """Whether ``param`` is sharded over the tensor-parallel dimension."""
    if not isinstance(param, DTensor):
        return False
    names = param.device_mesh.mesh_dim_names or ()
    placement = param.placements[names.index("tp")] if "tp" in names else None
    return placement is not None and (placement.is_shard() or isinstance(placement, _StridedShard))


def reduce_sequence_parallel_grads(params: list[torch.Tensor], tp_mesh: DeviceMesh) -> None:
    """Sum the gradients of the parameters applied to sequence-split activations (the norms)
    over the tensor-parallel ranks, in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None and not is_tensor_parallel(p, tp_mesh)]
    if not grads:
        return
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    flat = torch.cat([g.reshape(-1) for g in local])
    dist.all_reduce(flat, group=tp_mesh.get_group())
    offset = 0
    for g in local:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
