"""Launch glue shared by the stats and KL kernels, and the specialization the AOT report compiles.

``specialize`` builds the constexprs and ``signature`` the argument types of one kernel variant; both
``launch`` (what runs) and ``report`` (what is compiled for sm_80/sm_90) go through them, so a GPU
launch is always one of the reported configurations.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch

from . import presets

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KINDS = {"f32*": "*fp32", "f64*": "*fp64", "i64*": "*i64", "i32": "i32", "f32": "fp32"}
_ALIGNED = ("D", "Dr")  # integer arguments hinted as multiples of 16 in the report (hidden sizes)


def module(kernel: str):
    return importlib.import_module(f"{__package__}.{kernel}")


def specialize(kernel: str, cfg: presets.Config, flags: dict, interp: bool) -> dict:
    mod = module(kernel)
    if set(flags) != set(mod.FLAGS):
        raise ValueError(f"{kernel} takes flags {mod.FLAGS}, got {sorted(flags)}")
    return {**cfg.blocks(mod.BLOCKS), **{k: bool(flags[k]) for k in mod.FLAGS}, "INTERP": interp}


def signature(kernel: str, dtype: torch.dtype, constexprs: dict) -> tuple[dict, dict]:
    """(signature, attrs) for triton.compile: pointers and hidden sizes hinted 16-divisible."""
    sig, attrs = {}, {}
    for i, (name, kind) in enumerate(module(kernel).ARGS):
        sig[name] = "*" + _TYPES[dtype] if kind == "in" else _KINDS[kind]
        if sig[name].startswith("*") or name in _ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    sig.update({k: "constexpr" for k in constexprs})
    return sig, attrs


def device_guard(device: torch.device):
    """The tensors' GPU made current for a launch (Triton launches on the current device and its current
    stream): tensors on cuda:1 while cuda:0 is current, as with a reference model on a second GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel: str, grid, dtype: torch.dtype, device: torch.device, flags: dict, **args) -> None:
    """Run one kernel on ``device`` (the tensors' device); grid(cfg) gives the launch grid for the preset
    selected for this device/dtype."""
    mod = module(kernel)
    cfg = presets.select(kernel, dtype, device)
    interp = device.type == "cpu"
    consts = specialize(kernel, cfg, flags, interp)
    with device_guard(device):
        mod.kernel[grid(cfg)](*(args[name] for name, _ in mod.ARGS), **consts, **cfg.options())


def vocab_splits(rows: int, vocab: int, device: torch.device, dtype: torch.dtype, kernel: str,
                 splits: int | None = None) -> tuple[int, int, int]:
    """(row blocks, splits, vocabulary tiles per split) for the forward kernels; every split is non-empty.

    Without ``splits``: on a GPU, ``whole_waves`` over the SMs (presets.CTAS_PER_SM programs each), each
    split keeping at least MIN_SPLIT_TILES vocabulary tiles; under the interpreter one split.
    """
    cfg = presets.select(kernel, dtype, device)
    n_rows = math.ceil(rows / cfg.BN)
    tiles = math.ceil(vocab / cfg.BV)
    if splits is None:
        splits = 1
        if device.type == "cuda":
            slots = torch.cuda.get_device_properties(device).multi_processor_count * presets.CTAS_PER_SM
            splits = whole_waves(n_rows, tiles // presets.MIN_SPLIT_TILES, slots)
    splits = max(1, min(splits, tiles))
    per = math.ceil(tiles / splits)
    return n_rows, math.ceil(tiles / per), per


def whole_waves(n_rows: int, max_splits: int, slots: int, min_fill: float = 0.9) -> int:
    """The fewest vocabulary splits s ≤ max_splits for which n_rows·s programs make at least two waves of
    ``slots`` concurrent programs, filled to at least ``min_fill`` on average (n_rows·s / (waves·slots));
    when none does, the smallest s with the best fill."""
    best, best_fill = 1, 0.0
    for s in range(1, max(1, max_splits) + 1):
        programs = n_rows * s
        fill = programs / (math.ceil(programs / slots) * slots)
        if programs >= 2 * slots and fill >= min_fill:
            return s
        if fill > best_fill + 1e-12:
            best, best_fill = s, fill
    return best


def _merge(m: torch.Tensor, s: torch.Tensor):
    """Merge per-split (max, Σexp) [S, M] into (max, Σexp, per-split scale e^{m_k − max}, shift m_k − max)."""
    if m.shape[0] == 1:
        return m[0], s[0], None, None
    top = m.amax(0)
    shift = m - top
    scale = torch.exp(shift)
    return top, (s * scale).sum(0), scale, shift


def combine_stats(part: torch.Tensor):
    """Part [5, S, M] (m, s, t, s2, z_label per split) → (lse, log s, t, s2, z_label) over the vocabulary."""
    m, s, t, s2, zl = part
    top, total, scale, shift = _merge(m, s)
    if scale is None:
        return top, total, t[0], s2[0], zl[0]
    # a split of banned (−inf) tokens only has m = −inf, s = 0: its share is 0, not (−inf·0)·0
    t = torch.where(s > 0, (t + shift * s) * scale, 0.0).sum(0)
    s2 = (s2 * scale * scale).sum(0)
    return top, total, t, s2, zl.sum(0)


def combine_kl(part: torch.Tensor, part64: torch.Tensor, reverse: bool):
    """Part [6, S, M] (m, mr, sr, cf, z_label, zr_label) and Part64 [2, S, M] (s, cr), merged in float64
    → float32 (kl, lse, ref_lse, z_label, zr_label).

    lse and ref_lse are rounded first and KL = E_a[z_a − z_b] − lse_a + lse_b is then formed from the
    rounded values, so that the backward's KL + lse − ref_lse reproduces E_p[z − zr] to float32 precision.
    """
    m, mr, sr, cf, zl, zrl = part.double()
    s, cr = part64
    top, total, scale, _ = _merge(m, s)
    rtop, rtotal, rscale, _ = _merge(mr, sr)
    if scale is None:
        cf, cr, zl, zrl = cf[0], cr[0], zl[0], zrl[0]
    else:
        cf, cr, zl, zrl = (cf * rscale).sum(0), (cr * scale).sum(0), zl.sum(0), zrl.sum(0)
    lse = (top + torch.log(total)).float()
    ref_lse = (rtop + torch.log(rtotal)).float()
    if reverse:
        kl = cr / total - lse.double() + ref_lse.double()
    else:
        kl = cf / rtotal - ref_lse.double() + lse.double()
    return kl.float(), lse, ref_lse, zl.float(), zrl.float()
