"""Argument checks shared by the public ops: every error names the argument and what was expected."""
from __future__ import annotations

import sys

import torch

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exact types: no subclass (DTensor, FakeTensor)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def gathered(x: object) -> object:
    """A sharded parameter as its full tensor inside the op, differentiably; anything else as is.

    A DTensor (FSDP2) becomes its ``full_tensor()``; a DeepSpeed ZeRO-3 partitioned parameter (it carries
    ``ds_id``) is gathered by :func:`fastpref._zero3.full`, its gradient left to ZeRO-3's reduce-scatter.
    Neither module is imported for plain tensors: a DTensor exists only once ``torch.distributed.tensor`` is
    loaded (importing it costs about a second), and a ZeRO-3 parameter only once DeepSpeed is.
    """
    if isinstance(x, torch.Tensor) and hasattr(x, "ds_id"):
        from ._zero3 import full  # imports deepspeed, which is loaded already when such a parameter exists

        return full(x)
    if type(x) in PLAIN_TENSORS or not isinstance(x, torch.Tensor):
        return x
    dtensor = sys.modules.get("torch.distributed.tensor")
    return x.full_tensor() if dtensor is not None and isinstance(x, dtensor.DTensor) else x


def check_head(
    prefix: str, hidden: object, weight: object, bias: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check one model's hidden [..., D], weight [V, D] and bias [V]; cast weight/bias to hidden's dtype.

    The logits are computed in hidden's dtype (as autocast would); the cast is differentiable,
    so a float32 master weight still receives its gradient. Sharded DTensors (FSDP2) and ZeRO-3 partitioned
    parameters are gathered here, inside the op, so their callers pass their parameters as they are.
    """
    h = check_tensor(f"{prefix}hidden", gathered(hidden))
    w = check_tensor(f"{prefix}weight", gathered(weight))
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}hidden must be a float16/bfloat16/float32/float64 tensor, got {h.dtype}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}weight must be a floating tensor, got {w.dtype}")
    if h.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape [..., D], got a 0-d tensor")
    if w.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape [V, D], got {tuple(w.shape)}")
    if w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"{prefix}weight has D={w.shape[1]} but {prefix}hidden has D={h.shape[-1]} "
            f"(hidden {tuple(h.shape)}, weight {tuple(w.shape)})"
        )
    if w.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have V >= 1 rows, got shape {tuple(w.shape)}")
    if w.device != h.device:
        raise ValueError(f"{prefix}weight is on {w.device} but {prefix}hidden is on {h.device}")
    b = None
    if bias is not None:
        b = check_tensor(f"{prefix}bias", gathered(bias))
        if b.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{prefix}bias must be a floating tensor, got {b.dtype}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"{prefix}bias must have shape [V]=[{w.shape[0]}], got {tuple(b.shape)}")
        if b.device != h.device:
            raise ValueError(f"{prefix}bias is on {b.device} but {prefix}hidden is on {h.device}")
        b = b.to(h.dtype)
    return h, w.to(h.dtype), b


def check_labels(labels: object, hidden: torch.Tensor, ignore_index: object) -> torch.Tensor:
    lab = check_tensor("labels", labels)
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {lab.dtype}")
    if tuple(lab.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have the leading shape of hidden {tuple(hidden.shape[:-1])}, got {tuple(lab.shape)}"
        )
    if lab.device != hidden.device:
        raise ValueError(f"labels is on {lab.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return lab


def label_masks(labels: torch.Tensor, vocab: int | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, bad), flat bool masks: label != ignore_index, and a valid label outside [0, V) (no host sync).

    vocab None: V unknown here, as for a vocabulary split over ranks; only negative labels are bad.
    """
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab)) if vocab is not None else valid & (flat < 0)
    return valid, bad


def _raise_bad(labels: torch.Tensor, bad: torch.Tensor, n_bad: int, vocab: int | None, ignore_index: int) -> None:
    first = int(labels.reshape(-1)[bad][0])
    raise ValueError(
        f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
        f"found {n_bad} label(s) outside, e.g. {first}"
    )


def check_label_range(labels: torch.Tensor, vocab: int | None, ignore_index: int) -> None:
    """Raises ValueError when a label outside [0, V) is not ignore_index (synchronises with the device)."""
    _valid, bad = label_masks(labels, vocab, ignore_index)
    n_bad = int(bad.sum())
    if n_bad:
        _raise_bad(labels, bad, n_bad, vocab, ignore_index)


def valid_rows(labels: torch.Tensor, vocab: int | None, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows to compute (label != ignore_index), or None when every row counts.

    Raises ValueError as :func:`check_label_range` does; one host synchronisation for both.
    """
    valid, bad = label_masks(labels, vocab, ignore_index)
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        _raise_bad(labels, bad, n_bad, vocab, ignore_index)
    if n_valid == valid.numel():
        return None
    return valid.nonzero().squeeze(1)


def frozen_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when only the hidden states need gradients (the head's weight and bias are frozen): the fused ops
    then form E_p[W] in the forward and need no backward pass over the vocabulary (fastpref._frozen)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad))
