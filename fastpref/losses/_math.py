"""Numerically stable building blocks shared by the loss modules (pure torch)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LN2 = math.log(2.0)
EXP_CLAMP = 80.0  # exp(80) ~ 5.5e34 is finite in fp32; TRL clamps f-DPO exponents at the same value


def f32(x: Tensor | float) -> Tensor:
    """Upcast to at least float32 (float64 stays float64); python numbers become fp32 tensors."""
    if not torch.is_tensor(x):
        return torch.tensor(float(x), dtype=torch.float32)
    if not x.is_floating_point():
        return x.to(torch.float32)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logsigmoid(x: Tensor) -> Tensor:
    """log σ(x) = -softplus(-x), stable for any finite x."""
    return F.logsigmoid(x)


def smoothed_nll(x: Tensor, eps: Tensor | float = 0.0) -> Tensor:
    """Label-smoothed logistic loss -(1-ε)·logσ(x) - ε·logσ(-x) (cDPO); ε = 0 gives -logσ(x)."""
    if not torch.is_tensor(eps) and eps == 0.0:
        return -logsigmoid(x)
    return -(1.0 - eps) * logsigmoid(x) - eps * logsigmoid(-x)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, switching branch at -ln 2 (Mächler 2012)."""
    # where() evaluates both branches; feed each one a value that is safe for it to keep gradients finite.
    near = x > -LN2
    a = torch.where(near, x, torch.full_like(x, -1.0))
    b = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def clamped_exp(x: Tensor, max: float = EXP_CLAMP) -> Tensor:
    """exp(min(x, max)): keeps exponentials finite for extreme log-ratios."""
    return torch.exp(torch.clamp(x, max=max))


def reverse_logcumsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """out[..., k] = log Σ_{j>=k} exp(x[..., j]) (torch.logcumsumexp is max-stabilised)."""
    return torch.logcumsumexp(x.flip(dim), dim).flip(dim)


def lengths_f(lengths: Tensor | None, name: str) -> Tensor:
    """Token counts as float, clamped to >= 1 (an empty completion must not divide by 0)."""
    require(**{name: lengths})
    return f32(lengths).clamp(min=1.0)


def require(**kwargs: object) -> None:
    """Raise ValueError naming every argument that is None."""
    missing = [k for k, v in kwargs.items() if v is None]
    if missing:
        raise ValueError(f"missing required argument(s): {', '.join(missing)}")


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ValueError unless lo <(=) value <(=) hi."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {value}")
