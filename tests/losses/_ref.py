"""Shared test helpers: random inputs, naive float64 primitives, and a value+gradient checker.

The reference formulas in the tests are written naively from the project's losses reference in float64
(log(1/(1+exp(-x))) etc.) and never call fastpref.losses.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

B, K, T = 6, 4, 7
D64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logps(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Plausible summed log-probs in [-60, -5]."""
    return -(5.0 + 55.0 * torch.rand(*shape, generator=g, dtype=D64))


def near(g: torch.Generator, x: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    return x + scale * torch.randn(x.shape, generator=g, dtype=D64)


def lengths(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(1, 20, shape, generator=g).to(torch.int64)


def pair(seed: int = 0, scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    cw, cl = logps(g, B), logps(g, B)
    return dict(chosen_logps=near(g, cw, scale), rejected_logps=near(g, cl, scale), ref_chosen_logps=cw,
                ref_rejected_logps=cl)


# naive float64 primitives
def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def logsig(x):
    return torch.log(sig(x))


def relu(x):
    return torch.clamp(x, min=0.0)


def check(fn: Callable, ref: Callable, inputs: dict, grad_keys: tuple[str, ...], hp: dict | None = None,
          ref_hp: dict | None = None, rtol: float = 1e-7, atol: float = 1e-9, rtol32: float = 2e-4) -> None:
    """Compare fn vs ref in float64 (value and gradient w.r.t. grad_keys), and fn's float32 path's value."""
    hp = hp or {}
    ref_hp = hp if ref_hp is None else ref_hp
    a = {k: (v.clone().requires_grad_(k in grad_keys) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    b = {k: (v.clone().requires_grad_(k in grad_keys) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    out, exp = fn(**a, **hp), ref(**b, **ref_hp)
    assert out.dtype == D64 and out.shape == exp.shape, (out.dtype, out.shape, exp.shape)
    torch.testing.assert_close(out, exp, rtol=rtol, atol=atol)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=D64).reshape(out.shape)  # per-example weights
    ga = torch.autograd.grad((out * w).sum(), [a[k] for k in grad_keys], allow_unused=True)
    gb = torch.autograd.grad((exp * w).sum(), [b[k] for k in grad_keys], allow_unused=True)
    for k, x, y in zip(grad_keys, ga, gb):
        x = torch.zeros_like(a[k]) if x is None else x
        y = torch.zeros_like(b[k]) if y is None else y
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"grad {k}: {m}")
    f32in = {k: (v.float() if torch.is_tensor(v) and v.dtype == D64 else v) for k, v in inputs.items()}
    out32 = fn(**f32in, **hp)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), exp.detach(), rtol=rtol32, atol=rtol32 * (1 + exp.abs().max().item()))


def assert_finite(fn: Callable, inputs: dict, grad_keys: tuple[str, ...], hp: dict | None = None) -> None:
    """Loss and gradients finite in float32."""
    a = {k: (v.float().clone().requires_grad_(k in grad_keys) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    out = fn(**a, **(hp or {}))
    assert torch.isfinite(out).all(), out
    grads = torch.autograd.grad(out.sum(), [a[k] for k in grad_keys], allow_unused=True)
    for k, gr in zip(grad_keys, grads):
        assert gr is None or torch.isfinite(gr).all(), (k, gr)


LN2 = math.log(2.0)
