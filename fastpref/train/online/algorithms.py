"""The online / iterative algorithms as presets of one round loop: what is sampled, how the judge's verdicts
become training items, which reference the loss sees, and which registry loss trains on them.

A round samples K completions per prompt from π_t (the policy at the round's start), judges them, builds
items, then trains ``epochs`` passes over the items. An *online* algorithm is the same loop with one batch of
prompts per round and exactly one optimiser step on it (fresh samples every step). Reference log-probs (π_ref: the starting policy; π_t) are
computed when the round's data is built, without gradients, and saved with it.

An item holds completions by *role*; the loss receives, for role r (prefix ``r_``, none for r = ""),
``{r_}logps`` / ``{r_}token_logps`` / ``{r_}mask`` of the policy, ``ref_{r_}logps`` / ``ref_{r_}token_logps``
of the reference and ``prev_{r_}logps`` of π_t, plus the item's judged inputs (win-rates, probabilities).

The RL algorithms (GRPO and its variants, RLOO) make one item per sample (role ""), its group-normalised
advantage as input; π_t, the sampling policy, is then the RL losses' ``old_token_logps``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ... import losses as L
from ...nn import loss_params
from .judges import Judge, JudgeError
from .logps import completion_logps, scatter, token_logps


@dataclass
class Group:
    """K policy samples for one prompt (+ the extra sample from π_ref or the mixture, if the algorithm has one)."""

    prompt: list[int]
    prompt_text: str
    samples: list[list[int]]
    texts: list[str]
    extra: list[int] | None = None
    extra_text: str | None = None
    rewards: list[float] | None = None


@dataclass
class Item:
    """One training example: completions by role, judged inputs, and the references' per-token log-probs."""

    prompt: list[int]
    seqs: dict[str, list[int]]
    inputs: dict[str, float] = field(default_factory=dict)
    ref: dict[str, list[float]] = field(default_factory=dict)
    prev: dict[str, list[float]] = field(default_factory=dict)


Built = tuple["Item | list[Item] | None", dict[str, float]]


# ------------------------------------------------------------------------------------------------ builders
def _best_worst(values: Tensor) -> tuple[int, int]:
    return int(torch.argmax(values)), int(torch.argmin(values))


def winrates(P: Tensor) -> Tensor:
    """P̂(y_i ≻ π_t) = (1/K)·Σ_j P(y_i ≻ y_j), j = i included with P = ½ (the official SPPO code) [K]."""
    return P.mean(1)


def build_sppo(g: Group, judge: Judge, opt: dict) -> Built:
    """Highest and lowest win-rate samples with their win-rates as targets; a group of equal win-rates is dropped."""
    w = winrates(judge.matrix(g.prompt_text, g.texts))
    i, j = _best_worst(w)
    if w[i] == w[j]:
        return None, {"tied": 1.0}
    return Item(g.prompt, {"chosen": g.samples[i], "rejected": g.samples[j]},
                {"chosen_winrates": float(w[i]), "rejected_winrates": float(w[j])}), {"tied": 0.0}


def build_gpo(g: Group, judge: Judge, opt: dict) -> Built:
    """As SPPO with ŝ(y_i) = (1/K)·Σ_j [s(y_i ≻ y_j) − s(y_j ≻ y_i)] = (2/K)·Σ_j s(y_i ≻ y_j) for P̂ − ½
    (skew-symmetric GPM scores, s(y ≻ y) = 0; the official pipeline's t_ij − t_ji)."""
    t = judge.skew(g.prompt_text, g.texts, clip=opt.get("gpm_clip", 10.0))
    s = (t - t.T).mean(1)
    i, j = _best_worst(s)
    if s[i] == s[j]:
        return None, {"tied": 1.0}
    return Item(g.prompt, {"chosen": g.samples[i], "rejected": g.samples[j]},
                {"chosen_scores": float(s[i]), "rejected_scores": float(s[j])}), {"tied": 0.0}


def build_best_worst(g: Group, judge: Judge, opt: dict) -> Built:
    """Iterative DPO / DNO: best- vs worst-win-rate sample, kept only when the win-rate gap exceeds ``margin``
    (DNO's large-margin filter; margin 0 drops only ties)."""
    w = winrates(judge.matrix(g.prompt_text, g.texts))
    i, j = _best_worst(w)
    gap = float(w[i] - w[j])
    if gap <= opt.get("margin", 0.0):
        return None, {"tied": float(gap == 0.0), "filtered": 1.0}
    return Item(g.prompt, {"chosen": g.samples[i], "rejected": g.samples[j]}), {"tied": 0.0, "filtered": 0.0,
                                                                                 "winrate_gap": gap}


def _judged_pair(g: Group, a: list[int], a_text: str, b: list[int], b_text: str, judge: Judge) -> tuple[dict | None, float]:
    p = judge.prefer([g.prompt_text], [a_text], [b_text])[0]
    if p == 0.5:
        return None, p
    return ({"chosen": a, "rejected": b} if p > 0.5 else {"chosen": b, "rejected": a}), p


def build_pair(g: Group, judge: Judge, opt: dict) -> Built:
    """Online DPO: two samples, the judge picks chosen and rejected (TRL); a tie (P = ½) is dropped."""
    seqs, p = _judged_pair(g, g.samples[0], g.texts[0], g.samples[1], g.texts[1], judge)
    return (Item(g.prompt, seqs) if seqs else None), {"tied": float(seqs is None), "pref_prob": p}


def _soft_pair(g: Group, judge: Judge, first: str, second: str) -> Built:
    """Samples 0 and 1 as roles (first, second) with P(first ≻ second) as ``pref_probs``; a tie is kept."""
    p = judge.prefer([g.prompt_text], [g.texts[0]], [g.texts[1]])[0]
    return Item(g.prompt, {first: g.samples[0], second: g.samples[1]}, {"pref_probs": p}), \
        {"tied": float(p == 0.5), "pref_prob": p}


def build_inpo(g: Group, judge: Judge, opt: dict) -> Built:
    """INPO: two samples (y, y′) with P(y ≻ y′) as ``pref_probs``; the loss is the expectation over the label
    drawn from Bernoulli(P) (a tie, P = ½, is an item with target 0, not dropped)."""
    return _soft_pair(g, judge, "chosen", "rejected")


def build_nash_md(g: Group, judge: Judge, opt: dict) -> Built:
    """y ~ π_θ judged against y′ ~ mixture: the item is y with probability P(y ≻ y′) (a tie is P = ½)."""
    p = judge.prefer([g.prompt_text], [g.texts[0]], [g.extra_text])[0]
    return Item(g.prompt, {"": g.samples[0]}, {"probability": p}), {"tied": float(p == 0.5), "pref_prob": p}


def build_xpo(g: Group, judge: Judge, opt: dict) -> Built:
    """y ~ π_θ against y_ref ~ π_ref: DPO pair by the judge, plus the exploration term on y_ref."""
    seqs, p = _judged_pair(g, g.samples[0], g.texts[0], g.extra, g.extra_text, judge)
    if seqs is None:
        return None, {"tied": 1.0, "pref_prob": p}
    return Item(g.prompt, {**seqs, "ref_sample": g.extra}), {"tied": 0.0, "pref_prob": p}


def build_vpo(g: Group, judge: Judge, opt: dict) -> Built:
    """Online DPO pair from two policy samples, plus the optimistic value term on y_ref ~ π_ref (role "")."""
    seqs, p = _judged_pair(g, g.samples[0], g.texts[0], g.samples[1], g.texts[1], judge)
    if seqs is None:
        return None, {"tied": 1.0, "pref_prob": p}
    return Item(g.prompt, {**seqs, "": g.extra}), {"tied": 0.0, "pref_prob": p}


def build_online_ipo(g: Group, judge: Judge, opt: dict) -> Built:
    """Two samples y, y′ with P(y ≻ y′) as ``pref_probs`` (the loss's IPO-2 form, other_pref_probs = ½)."""
    return _soft_pair(g, judge, "", "other")


ADVANTAGES = ("grpo", "dr_grpo", "rloo")
STD_EPS = 1e-4  # TRL's GRPOTrainer: (r - mean) / (std + 1e-4)


def group_advantages(rewards: Tensor, kind: str) -> Tensor:
    """Advantages [G] of the G samples of one prompt from their rewards [G] (float64):

    * ``grpo`` (Shao+24, TRL): (r_i − mean(r)) / (std(r) + 1e-4), std the unbiased sample standard deviation;
    * ``dr_grpo`` (Liu+25, Dr. GRPO): r_i − mean(r), no division by the std;
    * ``rloo`` (Ahmadian+24): r_i − (1/(G−1))·Σ_{j≠i} r_j, the mean of the others as the baseline.
    """
    r = rewards.double()
    G = r.numel()
    if G < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got {G}")
    if kind == "grpo":
        return (r - r.mean()) / (r.std() + STD_EPS)
    if kind == "dr_grpo":
        return r - r.mean()
    if kind == "rloo":
        return r - (r.sum() - r) / (G - 1)
    raise ValueError(f"unknown advantage {kind!r}; known: {', '.join(ADVANTAGES)}")


def rl_builder(kind: str) -> Callable[[Group, Judge, dict], Built]:
    """The RL algorithms' builder: one item per sample (role ""), its ``kind`` group advantage as input. A group
    of equal rewards has zero advantages: its items are kept (they count in the loss normalisation, as TRL)."""
    def build(g: Group, judge: Judge, opt: dict) -> Built:
        if g.rewards is None:
            raise JudgeError(f"{judge.name} gives no rewards; RL algorithms need a reward judge")
        r = torch.tensor(g.rewards, dtype=torch.float64)
        adv = group_advantages(r, kind)
        items = [Item(g.prompt, {"": s}, {"advantages": float(a)}) for s, a in zip(g.samples, adv)]
        return items, {"tied": float(bool((r == r[0]).all())), "reward_std": float(r.std())}

    build.__doc__ = f"One item per sample with its {kind} group advantage (:func:`group_advantages`)."
    return build


# ------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Algorithm:
    """name; loss {registry name: weight}; hparams (paper defaults, overridable with --beta / --loss-args);
    samples K per prompt from π_t; extra: one more sample per prompt from "reference" (π_ref) or "mixture";
    online: fresh samples every step; reference: "initial" (π_ref) or "previous" (π_t) for the ref_* inputs;
    rounds: default number of rounds; sampling: the paper's / reference implementation's (temperature, top_p)
    for real models (the synthetic demo samples at (1, 1)); teacher: the prompts' reference answer joins the
    K samples as a candidate (DNO); accumulate: a step draws its batch from the items of earlier rounds too
    (XPO); advantage: an RL algorithm's group advantage (:func:`group_advantages`): one item per sample, a step
    on all of the fresh batch, ``--epochs`` such steps on it (PPO-style, clipped ratio to π_t)."""

    name: str
    paper: str
    loss: dict
    hparams: dict
    samples: int
    build: Callable[[Group, Judge, dict], Built]
    online: bool = False
    extra: str | None = None
    reference: str = "initial"
    rounds: int = 3
    extragradient: bool = False
    sampling: tuple[float, float] = (1.0, 1.0)
    teacher: bool = False
    accumulate: bool = False
    advantage: str | None = None

    @property
    def rl(self) -> bool:
        """Whether the algorithm is an RL one (items are samples with advantages)."""
        return self.advantage is not None

    def describe(self, rounds: int | None = None, hparams: dict | None = None) -> str:
        """One line: rounds, samples, reference rule, loss (the preset's defaults unless given)."""
        rounds = rounds or self.rounds
        mode = "online: fresh samples every step" if self.online else f"iterative: {rounds} rounds"
        ex = f" + 1 from {'the geometric mixture' if self.extra == 'mixture' else 'π_ref'}" if self.extra else ""
        params = set().union(*(loss_params(L.get(n)) for n in self.loss))
        uses_prev = any(p.startswith("prev_") for p in params)
        uses_ref = any(p.startswith("ref_") and p != "ref_sample_logps" for p in params)
        ref = " and ".join(([("π_t" if self.reference == "previous" else "π_ref")] if uses_ref else []) +
                           (["π_t"] if uses_prev and not (uses_ref and self.reference == "previous") else []))
        hp = ", ".join(f"{k}={v}" for k, v in (hparams or self.hparams).items())
        opt = "; extragradient optimiser (EGPO)" if self.extragradient else ""
        opt += "; batches drawn from every round's pairs so far" if self.accumulate else ""
        ex += " + the teacher's answer (if the prompts have one)" if self.teacher else ""
        if self.rl:
            mode += " (--epochs clipped steps on each)"
            ex += f", {self.advantage} advantages"
            ref = ref if float((hparams or self.hparams).get("beta", 0.0)) else ""  # no KL term: no reference
        return (f"{self.name} ({self.paper}): {mode}; K={self.samples} samples/prompt{ex}; reference {ref or 'none'}; "
                f"loss {'+'.join(self.loss)} ({hp}){opt}")


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in [
    Algorithm("sppo", "Wu+24", {"sppo": 1.0}, {"beta": 0.001}, 5, build_sppo, rounds=3, sampling=(0.7, 0.9)),
    Algorithm("gpo", "Zhang+24 GPM", {"gpo": 1.0}, {"beta": 0.001}, 5, build_gpo, rounds=3, sampling=(0.7, 0.9)),
    Algorithm("iterative_dpo", "Xiong+24; RLHFlow", {"sigmoid": 1.0}, {"beta": 0.1}, 8, build_best_worst,
              rounds=3),
    Algorithm("dno", "Rosset+24, practical DNO", {"sigmoid": 1.0}, {"beta": 0.1}, 5, build_best_worst,
              reference="previous", rounds=3, teacher=True),
    Algorithm("inpo", "Zhang+24 INPO", {"inpo": 1.0}, {"tau": 0.1, "eta": 0.2}, 2, build_inpo, rounds=3),
    Algorithm("online_dpo", "Guo+24 OAIF; TRL OnlineDPOTrainer", {"sigmoid": 1.0}, {"beta": 0.1}, 2, build_pair,
              online=True, rounds=100, sampling=(0.9, 1.0)),
    Algorithm("nash_md", "Munos+23; TRL NashMDTrainer", {"nash_md": 1.0}, {"beta": 0.1}, 1, build_nash_md,
              online=True, extra="mixture", rounds=100, sampling=(0.9, 1.0)),
    Algorithm("online_ipo", "Zhou+25 EGPO", {"online_ipo": 1.0}, {"beta": 0.1}, 2, build_online_ipo,
              online=True, rounds=100, extragradient=True, sampling=(2.0, 1.0)),
    Algorithm("xpo", "Xie+24; TRL XPOTrainer", {"sigmoid": 1.0, "xpo": 1.0}, {"beta": 0.1, "alpha": 1e-5}, 1,
              build_xpo, online=True, extra="reference", rounds=100, sampling=(0.9, 1.0), accumulate=True),
    Algorithm("vpo", "Cen+24", {"sigmoid": 1.0, "vpo": 1.0}, {"beta": 0.1, "alpha": 0.01}, 2, build_vpo,
              online=True, extra="reference", rounds=100),
    Algorithm("grpo", "Shao+24 DeepSeekMath", {"grpo": 1.0},
              {"beta": 0.04, "loss_type": "grpo", "use_bias_correction_kl": False}, 8, rl_builder("grpo"),
              online=True, rounds=100, advantage="grpo"),
    Algorithm("dr_grpo", "Liu+25 Dr. GRPO", {"grpo": 1.0}, {"beta": 0.0, "loss_type": "dr_grpo"}, 8,
              rl_builder("dr_grpo"), online=True, rounds=100, advantage="dr_grpo"),
    Algorithm("dapo", "Yu+25 DAPO (clip-higher, token mean)", {"grpo": 1.0},
              {"beta": 0.0, "loss_type": "dapo", "epsilon_high": 0.28}, 8, rl_builder("grpo"), online=True,
              rounds=100, advantage="grpo"),
    Algorithm("bnpo", "TRL GRPOTrainer loss_type='bnpo'", {"grpo": 1.0}, {"beta": 0.0, "loss_type": "bnpo"}, 8,
              rl_builder("grpo"), online=True, rounds=100, advantage="grpo"),
    Algorithm("rloo", "Ahmadian+24 RLOO", {"grpo": 1.0}, {"beta": 0.0, "loss_type": "grpo"}, 8,
              rl_builder("rloo"), online=True, rounds=100, advantage="rloo"),
]}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


# ------------------------------------------------------------------------------------------------ references
def reference_logps(items: list[Item], *, policy, ref, loss: "ItemLoss", reference: str, pad_id: int,
                    backend: str = "auto", logps: Callable = completion_logps) -> None:
    """Fill ``item.ref`` (π_ref, or π_t when ``reference="previous"``) and ``item.prev`` (π_t = ``policy`` as
    the round starts) with per-token log-probs of every role's completion, where the loss needs them; no grad.
    ``logps``: how a model scores completions (:func:`completion_logps`; the small games pass a table's)."""
    if not items or not (loss.needs_ref or loss.needs_prev):
        return
    roles = list(items[0].seqs)
    seqs = [(it.prompt, it.seqs[r]) for it in items for r in roles]
    prev = logps(policy, seqs, pad_id=pad_id, backend=backend) \
        if (loss.needs_prev or reference == "previous") else None
    per_item = lambda v, k: {r: v[k * len(roles) + j] for j, r in enumerate(roles)}  # noqa: E731
    if loss.needs_ref:
        lp = prev if reference == "previous" else logps(ref, seqs, pad_id=pad_id, backend=backend)
        for k, it in enumerate(items):
            it.ref = per_item(lp, k)
    if loss.needs_prev:
        for k, it in enumerate(items):
            it.prev = per_item(prev, k)


# ------------------------------------------------------------------------------------------------ the loss
def _reads_reference(fn: Callable, params: set[str], hparams: dict) -> bool:
    """Whether a loss reads the reference's log-probs: it names a ``ref_`` input (``ref_sample_logps`` is a
    policy term), unless it is an RL loss (one with a KL term, ``token_kl``) whose β is 0."""
    if not any(p.startswith("ref_") and p != "ref_sample_logps" for p in params):
        return False
    if "token_kl" in params:
        return float(hparams.get("beta", inspect.signature(fn).parameters["beta"].default)) != 0.0
    return True


class ItemLoss:
    """Registry losses {name: weight} on items: per-item loss [B] from the policy through the fused primitive
    (``logps``: :func:`token_logps`, or a table's in the small games)."""

    def __init__(self, weights: dict[str, float], hparams: dict, *, pad_id: int, backend: str = "auto",
                 logps: Callable = token_logps):
        self.fns = {n: L.get(n) for n in weights}
        self.weights, self.params = dict(weights), {n: loss_params(f) for n, f in self.fns.items()}
        accepted = set().union(*self.params.values())
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise ValueError(f"hyper-parameter(s) {unknown} are not taken by loss(es) {sorted(self.fns)}")
        L.check_values(self.fns, hparams)  # the API's checks of values (finite, in range)
        self.hparams, self.pad_id, self.backend, self.logps = dict(hparams), pad_id, backend, logps
        self.needs_ref = any(_reads_reference(self.fns[n], ps, self.hparams) for n, ps in self.params.items())
        self.needs_prev = any(p.startswith(("prev_", "old_")) for p in accepted)

    def inputs(self, policy, items: list[Item]) -> dict:
        """Every quantity a loss may name (see the module docstring); policy terms carry gradients."""
        roles = list(items[0].seqs)
        B = len(items)
        tok, mask = self.logps(policy, [(it.prompt, it.seqs[r]) for r in roles for it in items],
                               pad_id=self.pad_id, backend=self.backend)
        kw: dict = {}
        for k, r in enumerate(roles):
            pre = f"{r}_" if r else ""
            t, m = tok[k * B:(k + 1) * B], mask[k * B:(k + 1) * B]
            kw.update({f"{pre}logps": t.sum(-1), f"{pre}token_logps": t, f"{pre}mask": m})
            for src in ("ref", "prev"):
                if getattr(items[0], src):
                    rt = scatter([getattr(it, src)[r] for it in items], m, tok.dtype)
                    kw.update({f"{src}_{pre}logps": rt.sum(-1), f"{src}_{pre}token_logps": rt})
                    if src == "prev":  # π_t sampled the round: the RL losses' π_old
                        kw[f"old_{pre}token_logps"] = rt
        for name in items[0].inputs:
            kw[name] = torch.tensor([it.inputs[name] for it in items], dtype=tok.dtype, device=tok.device)
        return kw

    def __call__(self, policy, items: list[Item]) -> Tensor:
        kw = {**self.inputs(policy, items), **self.hparams}
        terms = {n: fn(**{k: v for k, v in kw.items() if k in self.params[n]}) for n, fn in self.fns.items()}
        return L.combine(terms, self.weights)
