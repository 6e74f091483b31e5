"""Policy + fused loss as one module (what DDP / FSDP2 wrap), the loss set-up, and evaluation metrics."""
from __future__ import annotations

import itertools
import math
import re

import torch
from torch import Tensor, nn

from .. import losses as L
from ..nn import PreferenceLoss, loss_params
from ..stats import token_logprobs
from . import data as D
from . import fields as F
from .dist import Dist
from .model import head, hidden_states


def seq_sums(tok: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Per-sequence sums of per-token values (ignored tokens are 0): [S]."""
    if cu_seqlens is None:
        return tok.sum(-1)
    cu = cu_seqlens.to(tok.device, torch.int64)
    seg = torch.searchsorted(cu[1:], torch.arange(tok.numel(), device=tok.device), right=True)
    return torch.zeros(cu.numel() - 1, device=tok.device, dtype=tok.dtype).index_add_(0, seg, tok.reshape(-1))


class Objective(nn.Module):
    """Runs the base model to its last hidden states, then the fused loss on the lm_head weight (never the
    [tokens × vocab] logits). Under FSDP2 this module is the root, so lm_head is unsharded in its forward.

    mode: "pref" → {"loss", "metrics"}; "sft" → {"loss"} (token NLL sum / ``norm``); "logps" → {"logps": [S]}."""

    def __init__(self, model: nn.Module, loss: PreferenceLoss, softcap: float | None = None, backend: str = "auto"):
        super().__init__()
        self.model, self.loss, self.softcap, self.backend = model, loss, softcap, backend

    def forward(self, input_ids: Tensor, position_ids: Tensor, labels: Tensor, cu_seqlens: Tensor | None = None,
                attention_mask: Tensor | None = None, keep: Tensor | None = None, mode: str = "pref",
                norm: float = 1.0, ref: dict | None = None, inputs: dict | None = None,
                scored: dict | None = None) -> dict:
        """``scored``: {loss input: extra batch as a tuple like ``call`` passes} whose per-sequence log-probs
        (with gradients, e.g. rationales) become that loss input."""
        inputs = dict(inputs or {})
        for name, (ids, pos, lab, cu, att, kp) in (scored or {}).items():
            hs = hidden_states(self.model, ids, pos, att)
            hs = unpad(hs, kp) if cu is not None else hs
            w, b = head(self.model)
            tok = token_logprobs(hs, w, lab, bias=b, softcap=self.softcap, backend=self.backend)
            inputs[name] = seq_sums(tok, cu)
        h = hidden_states(self.model, input_ids, position_ids, attention_mask)
        if cu_seqlens is not None:  # packed rows → [N, D], sequences in order
            h = unpad(h, keep)
        w, b = head(self.model)
        if mode == "pref":
            ref = dict(ref or {})
            if ref.get("ref_hidden") is not None and cu_seqlens is not None:
                ref["ref_hidden"] = unpad(ref["ref_hidden"], keep)
            out = self.loss(h, w, labels, bias=b, cu_seqlens=cu_seqlens, **ref, **inputs)
            return {"loss": out.loss, "metrics": out.metrics}
        logp = token_logprobs(h, w, labels, bias=b, softcap=self.softcap, backend=self.backend)
        if mode == "sft":
            return {"loss": -logp.sum() / norm}
        return {"logps": seq_sums(logp, cu_seqlens)}


def unpad(h: Tensor, keep: Tensor | None) -> Tensor:
    """Packed rows [R, L, D] → the real tokens [N, D] in sequence order."""
    flat = h.reshape(-1, h.shape[-1])
    return flat if keep is None else flat.index_select(0, keep)


def tensors(b: D.Batch) -> tuple:
    """The batch as the Objective's positional inputs."""
    return b.input_ids, b.position_ids, b.labels, b.cu_seqlens, b.attention_mask, b.keep


def call(module: nn.Module, b: D.Batch, **kw) -> dict:
    return module(*tensors(b), **kw)


# ------------------------------------------------------------------------------------------------- loss set-up
def make_loss(weights: dict[str, float], hparams: dict, layout: str, k: int | None, softcap: float | None,
              backend: str) -> PreferenceLoss:
    """PreferenceLoss for the data layout; beta defaults to 0.1 where a loss takes it."""
    fns = [L.get(n) for n in weights]  # ValueError listing the known names
    accepted = set().union(*map(loss_params, fns))
    hp = dict(hparams)
    if "beta" not in hp and "beta" in accepted:
        hp["beta"] = 0.1
    hp = {k_: v for k_, v in hp.items() if k_ != "beta" or "beta" in accepted}
    if "bco" in weights and "delta" not in hp:  # BCO's δ: the running reward mean (Jung+24, TRL's BCOTrainer)
        hp["delta"] = "running"
    return PreferenceLoss(weights, layout=layout, num_responses=k if layout == "list" else None,
                          softcap=softcap, backend=backend, **hp)


def loss_inputs(loss: PreferenceLoss, layout: str, inputs: dict[str, Tensor]) -> dict:
    """The extra inputs the data provides, for the losses that take them (``fields.NUMBERS``: e.g. listwise
    scores also as graded ``rewards`` / ``relevance``, or -ranks when there are no scores), unpaired
    ``desirable``. KTO's reference point ``kl`` comes from the loop (:func:`fastpref.train.unpaired.kto_kl`)
    unless set with --loss-args kl=..."""
    acc = loss.accepted
    out: dict = {}
    for name, (_, _, feeds, _) in F.NUMBERS.items():
        if inputs.get(name) is not None:
            out.update({k: inputs[name] for k in feeds if k in acc})
    if layout == "list" and inputs.get("scores") is None and inputs.get("ranks") is not None:
        out.update({k: -inputs["ranks"] for k in F.FROM_RANKS if k in acc})
    if layout == "unpaired":
        out["desirable"] = inputs["desirable"]
    if loss.nll_tokens == "sequence":
        out["nll_labels"] = inputs["nll_labels"]
    return out


def needs_kto_kl(loss: PreferenceLoss) -> bool:
    """Whether the loop must estimate KTO's reference point (a loss takes ``kl`` and no constant was set)."""
    return "kl" in loss.accepted and "kl" not in loss.hparams


def needs_token_ref(loss: PreferenceLoss) -> bool:
    """Whether the loss needs the reference model every step (token-level KL / token log-probs)."""
    return loss.needs_kl or loss.needs_tokens


def dry_run(loss: PreferenceLoss, layout: str, k: int | None, ref_mode: str,
            provided: frozenset[str] | set[str] = frozenset()) -> None:
    """Fail early, with the loss and layout named, when the loss cannot be computed from this data.

    ``provided``: the data's per-example fields (``fields.NUMBERS`` / ``TEXTS`` names) and the extra models
    given ("prev_model", "token_reward_model"). A missing loss input is reported with the data field or flag
    that provides it."""
    g = torch.Generator().manual_seed(0)
    B = 2
    S = {"pairs": 2 * B, "list": B * (k or 2), "unpaired": B}[layout]
    h, w = torch.randn(S, 3, 8, generator=g), torch.randn(8, 8, generator=g)
    labels = torch.randint(0, 8, (S, 3), generator=g)
    per_example = (B, k or 2) if layout == "list" else (B,)
    inputs = {n: 0.1 + 0.8 * torch.rand(per_example, generator=g) for n, (lay, *_) in F.NUMBERS.items()
              if lay == layout and n in provided}
    if layout == "list":  # every list row has scores or ranks
        if "ranks" in provided and "scores" not in provided:
            inputs["ranks"] = torch.arange(1.0, (k or 2) + 1).expand(per_example)
        else:
            inputs["scores"] = torch.randn(per_example, generator=g)
            inputs.pop("ranks", None)
    if layout == "unpaired":
        inputs["desirable"] = torch.tensor([True, False])
    inputs["nll_labels"] = torch.randint(0, 8, (S, 3), generator=g)
    extra = {feed: torch.randn(B, generator=g) for n, (lay, _, feed) in F.TEXTS.items()
             if lay == layout and n in provided and feed in loss.accepted}
    if "prev_model" in provided and layout == "pairs":
        extra.update(prev_chosen_logps=torch.randn(B, generator=g), prev_rejected_logps=torch.randn(B, generator=g))
    if "token_reward_model" in provided:
        extra["rm_token_logps"] = torch.randn(S, 3, generator=g)
    if needs_kto_kl(loss):
        extra["kl"] = torch.tensor(0.1)
    ref = {}
    if ref_mode == "precompute":
        ref = {"ref_logps": torch.randn(S, generator=g)}
    elif ref_mode == "online":
        ref = {"ref_hidden": torch.randn(S, 3, 8, generator=g), "ref_weight": torch.randn(8, 8, generator=g)}
    was = loss.training
    loss.eval()  # no running statistics from the test batch
    try:
        out = loss(h, w, labels, **ref, **loss_inputs(loss, layout, inputs), **extra)
        if not torch.isfinite(out.loss):
            raise ValueError("non-finite loss on a test batch")
    except (ValueError, TypeError, KeyError) as e:
        hints = sorted({f"{name}: {F.source(name)}" for name in re.findall(r"[a-z_]+", str(e)) if F.source(name)})
        hint = f" (give {'; '.join(hints)})" if hints else ""
        raise SystemExit(f"--loss {','.join(loss.fns)} cannot be trained on {layout!r} data here: {e}{hint}") from None
    finally:
        loss.train(was)


# -------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def dataset_logps(module: nn.Module, ds: D.Dataset, *, packed: bool, pad_id: int, batch_size: int, d: Dist,
                  device, autocast, pack_length: int = 0) -> Tensor:
    """Per-sequence log-probs [n_examples, seqs per example] (float32), computed in shards across ranks
    (every rank runs the same number of forwards, as FSDP needs) and summed into every rank."""
    n, k = len(ds), ds.num_responses
    out = torch.zeros(n, k, device=device)
    mine = list(range(d.rank, n, d.world))
    rounds = math.ceil(math.ceil(n / d.world) / batch_size)
    was = module.training
    module.eval()
    for r in range(rounds):
        idx = mine[r * batch_size:(r + 1) * batch_size]
        real = len(idx)
        idx = idx or [0]
        b = D.collate(D.sequences(ds, idx), packed=packed, pad_id=pad_id, pack_length=pack_length).to(device)
        with autocast():
            lp = call(module, b, mode="logps")["logps"].float()
        lp = lp.reshape(k, -1).T if ds.layout == "pairs" else lp.reshape(-1, k)
        if real:
            out[torch.tensor(idx, device=device)] = lp[:real]
    module.train(was)
    return d.sum_(out)


def _acc(diff: Tensor) -> float:
    """Fraction of comparisons won (ties count one half: identical policy and reference give 0.5)."""
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def metrics(ds: D.Dataset, pol: Tensor, ref: Tensor | None, beta: float) -> dict[str, float | None]:
    """Held-out reward accuracy (β·log-ratio to the reference ranks the preferred answer first) and ranking
    accuracy (the policy's own log-probs do), plus margins and mean log-probs. Ties count one half."""
    pol = pol.double().cpu()
    r = beta * (pol - ref.double().cpu()) if ref is not None else pol
    m: dict[str, float | None] = {}
    if ds.layout == "pairs":
        m["reward_accuracy"] = _acc(r[:, 0] - r[:, 1])
        m["ranking_accuracy"] = _acc(pol[:, 0] - pol[:, 1])
        m["margin"] = float((r[:, 0] - r[:, 1]).mean())
        m["logps_chosen"], m["logps_rejected"] = float(pol[:, 0].mean()), float(pol[:, 1].mean())
    elif ds.layout == "list":
        right_r = right_p = total = 0
        for e, rr, pp in zip(ds.examples, r, pol):
            key = e.scores if e.scores is not None else [-x for x in e.ranks]
            for i, j in itertools.combinations(range(len(key)), 2):
                if key[i] != key[j]:
                    sign = 1 if key[i] > key[j] else -1
                    right_r += _acc(sign * (rr[i] - rr[j]))
                    right_p += _acc(sign * (pp[i] - pp[j]))
                    total += 1
        m["reward_accuracy"] = right_r / total if total else None
        m["ranking_accuracy"] = right_p / total if total else None
        m["logps_mean"] = float(pol.mean())
    else:
        lab = torch.tensor([bool(e.label) for e in ds.examples])
        m["reward_accuracy"] = _acc(torch.where(lab, r[:, 0], -r[:, 0]))
        by_prompt: dict[str, list] = {}
        for e, p in zip(ds.examples, pol[:, 0].tolist()):
            by_prompt.setdefault(e.prompt_key, []).append((e.label, p))
        pairs = [a - b for v in by_prompt.values() for la, a in v for lb, b in v if la and not lb]
        m["ranking_accuracy"] = _acc(torch.tensor(pairs)) if pairs else None
        m["logps_mean"] = float(pol.mean())
    return m
