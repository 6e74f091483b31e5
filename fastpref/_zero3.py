"""DeepSpeed ZeRO-3 partitioned parameters, gathered inside the op (imported only once such a parameter is seen).

Semantics of :func:`full`, for a parameter ZeRO-3 has partitioned (``ds_status`` NOT_AVAILABLE, ``.data`` empty):

* forward: the parameter is all-gathered (``GatheredParameters``, read-only), copied into a private full tensor
  that the op uses (and keeps for its backward), and re-partitioned at once — the op's caller never sees a
  gathered parameter, and nothing is left gathered if no backward follows (evaluation, a frozen reference model);
* backward: the gradient of that copy goes to the parameter itself, so ZeRO-3's own gradient hook reduce-scatters
  it (bucketing, averaging over ranks, gradient accumulation and the optimizer step stay DeepSpeed's). Torch
  accumulates a gradient only into a parameter of its full shape, so the parameter is all-gathered again just
  before its gradient arrives and re-partitioned right after ZeRO-3's hook has taken the gradient (unless a
  module's backward still uses it, as a tied input embedding's does: DeepSpeed releases it after that module).

A parameter that is already available (persistent small parameters, or one DeepSpeed's module hooks gathered —
e.g. the op runs inside the engine's forward, where accessing ``lm_head.weight`` registers it as an external
parameter of the running module and DeepSpeed keeps it gathered through the backward) is used as it is.
Cost: the full weight is held from forward to backward (as FSDP2's gathered DTensor is), plus one all-gather in
the backward.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus


def _partitioned(param: torch.Tensor) -> bool:
    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


class _FullCopy(torch.autograd.Function):
    """Forward: a copy of the (gathered) parameter. Backward: the gradient, into the re-gathered parameter."""

    @staticmethod
    def forward(ctx, param):
        ctx.param = param
        return param.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        param = ctx.param
        if _partitioned(param):
            param.all_gather()

            def release(_):
                handle.remove()
                if not param.ds_active_sub_modules:  # else DeepSpeed releases it after that module's backward
                    param.partition()

            handle = param.register_post_accumulate_grad_hook(release)  # runs after ZeRO-3's own hook
        return grad


def full(param: torch.Tensor) -> torch.Tensor:
    """The full value of a ZeRO-3 parameter for the op, differentiably (see the module docstring)."""
    if not _partitioned(param):
        return param
    # gathered while the copy is recorded, so autograd's edge to the parameter has its full shape
    with GatheredParameters([param], modifier_rank=None):
        return _FullCopy.apply(param)
