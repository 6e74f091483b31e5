"""Registry, input validation, import isolation, and extreme-margin stability of every registered loss."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ref import B, K, T, assert_finite

import fastpref.losses as L

ROOT = Path(__file__).resolve().parents[2]
PAIR = ("chosen_logps", "rejected_logps")
TOK = ("chosen_token_logps", "rejected_token_logps")


def extreme(name: str, m: float) -> tuple[dict, tuple, dict]:
    """(inputs, policy grad keys, hyper-parameters) with policy-vs-reference margins of size m (may be < 0)."""
    ones = torch.ones(B)
    ref_c, ref_r = -50.0 * ones, -60.0 * ones
    pair = dict(chosen_logps=ref_c + m, rejected_logps=ref_r - m, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    pol = {k: pair[k] for k in PAIR}
    n = torch.arange(1, B + 1)
    lens = dict(chosen_lengths=n, rejected_lengths=n.flip(0))
    neg = dict(chosen_logps=-abs(m) * ones, rejected_logps=-1e-9 * ones)  # valid log-probs (<= 0), extreme odds
    prev = {k.replace("ref_", "prev_"): v for k, v in pair.items()}
    unp = dict(logps=ref_c + m * torch.linspace(-1, 1, B), ref_logps=ref_c, desirable=torch.arange(B) % 2 == 0)
    lw = dict(logps=-50.0 + m * torch.linspace(-1, 1, K).expand(B, K), ref_logps=torch.full((B, K), -50.0))
    scores = dict(rewards=torch.linspace(-m, m, K).expand(B, K).contiguous())
    tokp = torch.full((B, T), -1.0)
    tok = dict(chosen_token_logps=tokp + m / T, rejected_token_logps=tokp - m / T, ref_chosen_token_logps=tokp,
               ref_rejected_token_logps=tokp)
    rw = dict(chosen_rewards=m * ones, rejected_rewards=-m * ones)
    kl = dict(logps=tokp + m / T, ref_logps=tokp)
    table = {
        **{k: (pair, PAIR, {}) for k in ("sigmoid", "hinge", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                                         "apo_zero", "apo_down", "discopop", "dpop", "cal_dpo", "flex_dpo")},
        "robust": (pair, PAIR, dict(label_smoothing=0.1)),
        "exo_pair": (pair, PAIR, dict(label_smoothing=1e-3)),
        "ipo": ({**pair, **lens}, PAIR, {}), "sigmoid_norm": ({**pair, **lens}, PAIR, {}),
        "rdpo": ({**pair, **lens}, PAIR, dict(alpha=0.05)),
        "ld_dpo": ({f"{k[:-6]}_{p}_logps": v / 2 for k, v in pair.items() for p in ("shared", "tail")},
                   ("chosen_shared_logps", "rejected_tail_logps"), dict(ld_alpha=0.5)),
        "sppo": ({**prev, "chosen_winrates": 0.9 * ones, "rejected_winrates": 0.1 * ones}, PAIR, {}),
        "gpo": ({**prev, "chosen_scores": 0.4 * ones, "rejected_scores": -0.4 * ones}, PAIR, {}),
        "inpo": ({**pair, **prev}, PAIR, dict(tau=0.1, eta=0.2)),
        "online_ipo": (dict(logps=pair["chosen_logps"], other_logps=pair["rejected_logps"], ref_logps=ref_c,
                            ref_other_logps=ref_r, pref_probs=0.7 * ones), ("logps", "other_logps"), {}),
        "rpo": ({**pair, "chosen_nll": ones}, PAIR, {}),
        "sft": (dict(chosen_logps=pair["chosen_logps"], chosen_lengths=n), ("chosen_logps",), {}),
        "xpo": (dict(ref_sample_logps=pair["chosen_logps"]), ("ref_sample_logps",), {}),
        "vpo": (dict(logps=pair["chosen_logps"]), ("logps",), dict(alpha=0.1)),
        "rdpo_rationale": ({**pair, "rationale_logps": -abs(m) * ones}, PAIR, {}),
        "simpo": ({**pol, **lens}, PAIR, {}), "slic": (pol, PAIR, {}),
        "cpo": ({**pol, "chosen_nll": ones}, PAIR, dict(alpha=0.1)),
        "orpo": ({**neg, **lens, "chosen_nll": ones}, PAIR, {}),
        "rorpo": ({**neg, **lens, "chosen_nll": ones, "rationale_logps": ones * -3.0}, PAIR, {}),
        "asft": ({**neg, **lens, "chosen_nll": ones}, PAIR, {}),
        "kto": (unp, ("logps",), dict(kl=0.5)), "bco": (unp, ("logps",), {}), "apo_zero_unpaired": (unp, ("logps",), {}),
        "tdpo1": ({**tok, "chosen_token_kl": torch.full((B, T), abs(m)), "rejected_token_kl": torch.zeros(B, T)},
                  TOK + ("chosen_token_kl",), {}),
        "tgdpo": ({**tok, "rm_chosen_token_logps": tokp - abs(m), "rm_rejected_token_logps": tokp}, TOK, {}),
        "nash_md": (dict(token_logps=tok["chosen_token_logps"], ref_token_logps=tokp, probability=0.8 * ones),
                    ("token_logps",), {}),
        "plackett_luce": ({**lw, "scores": scores["rewards"]}, ("logps",), {}),
        "pro": (dict(logps=lw["logps"], lengths=torch.full((B, K), 3), **scores), ("logps",), {}),
        "rrhf": (dict(logps=lw["logps"], lengths=torch.full((B, K), 3), **scores), ("logps",), {}),
        "lipo_lambda": ({**lw, "relevance": torch.arange(K).expand(B, K)}, ("logps",), {}),
        **{k: ({**lw, **scores}, ("logps",), {}) for k in ("infonca", "nca", "exo")},
        "brain": ({**lw, **scores, "proposal_logps": lw["logps"] - m}, ("logps",), {}),
        "bt": (rw, ("chosen_rewards",), dict(margin=1.0, center_rewards_coefficient=0.01)),
        "scaled_bt": ({**rw, "strength": 2 * ones}, ("chosen_rewards",), {}),
        "regression": (dict(predictions=m * ones, targets=ones), ("predictions",), {}),
        "gpm": (dict(chosen_embeddings=torch.full((B, 4), m), rejected_embeddings=torch.full((B, 4), -m).flip(-1)),
                ("chosen_embeddings",), {}),
        "lsc": (dict(rewards=rw["chosen_rewards"], ref_rewards=ones), ("rewards",), {}),
        "micro": ({**{k: v[:, None].expand(B, 3) for k, v in rw.items()}, "router_logits": m * torch.eye(B, 3)},
                  ("chosen_rewards", "router_logits"), {}),
        **{k: (kl, ("logps",), {}) for k in ("k1", "k2", "k3")},
        **{k: (dict(token_logps=tokp + m / T, old_token_logps=tokp, ref_token_logps=tokp - m / T,
                    advantages=torch.linspace(-1, 1, B), entropies=torch.full((B, T), abs(m))), ("token_logps",),
                dict(beta=0.04, entropy_coef=0.01)) for k in ("grpo", "ppo_clip", "gspo", "cispo")},
    }
    table["tdpo2"] = table["tdpo1"]
    table["egpo"] = table["online_ipo"]
    return table[name]


def test_names_sorted_and_every_name_has_a_stability_case():
    names = L.names()
    assert names == sorted(names) and len(names) == len(set(names))
    for name in names:
        extreme(name, 1.0)
        assert L.get(name).__doc__, name
        assert getattr(L, name) is L.get(name)


@pytest.mark.parametrize("m", [1e4, -1e4])
@pytest.mark.parametrize("name", L.names())
def test_extreme_margins_are_finite(name, m):
    inputs, grads, hp = extreme(name, m)
    assert_finite(L.get(name), inputs, grads, hp)


@pytest.mark.parametrize("f", ["forward_kl", "alpha_divergence", "js_divergence"])
@pytest.mark.parametrize("m", [1e4, -1e4])
def test_extreme_margins_f_divergences(f, m):
    inputs, grads, _ = extreme("sigmoid", m)
    for name in ("sigmoid", "robust", "ipo", "discopop"):
        inp, _, hp = extreme(name, m)
        assert_finite(L.get(name), inp, grads, dict(hp, f_divergence_type=f, f_alpha_divergence_coef=0.2))


def test_bf16_inputs_are_computed_in_fp32():
    inputs, _, _ = extreme("sigmoid", 1.0)
    out = L.sigmoid(**{k: v.to(torch.bfloat16) for k, v in inputs.items()})
    assert out.dtype == torch.float32


def test_papers_names_map_and_unknown_names_get_the_closest():
    assert L.get("dpo") is L.sigmoid and L.get("DPO") is L.sigmoid and L.resolve("RSO") == "hinge"
    with pytest.raises(ValueError, match="loss 'sigmoud': unknown loss; did you mean 'sigmoid'"):
        L.get("sigmoud")
    with pytest.raises(ValueError, match="known: .*sigmoid"):
        L.get("zzz")


@pytest.mark.parametrize("name,missing", [
    ("sigmoid", "ref_chosen_logps"), ("ipo", "chosen_lengths"), ("sigmoid_norm", "rejected_lengths"),
    ("rdpo", "alpha"), ("ld_dpo", "ld_alpha"), ("inpo", "tau"), ("orpo", "chosen_nll"), ("cpo", "chosen_nll"),
    ("sppo", "chosen_winrates"), ("kto", "kl"), ("tdpo1", "chosen_token_kl"), ("plackett_luce", "scores"),
    ("pro", "rewards"), ("simpo", "chosen_lengths"), ("vpo", "alpha"), ("scaled_bt", "strength"),
    ("lipo_lambda", "relevance"), ("brain", "proposal_logps"),
])
def test_missing_inputs_name_the_argument(name, missing):
    inputs, _, hp = extreme(name, 1.0)
    inputs, hp = dict(inputs), dict(hp)
    inputs.pop(missing, None), hp.pop(missing, None)
    if missing == "scores":
        inputs.pop("ranks", None)
    with pytest.raises(ValueError, match=missing):
        L.get(name)(**inputs, **hp)


@pytest.mark.parametrize("name,hp,match", [
    ("robust", dict(label_smoothing=0.5), "label_smoothing"), ("robust", dict(label_smoothing=-0.1), "label_smoothing"),
    ("exo_pair", dict(label_smoothing=0.0), "label_smoothing"),
    ("sigmoid", dict(label_smoothing=1.5), "label_smoothing"), ("ld_dpo", dict(ld_alpha=1.5), "ld_alpha"),
    ("sigmoid", dict(f_divergence_type="chi2"), "f_divergence_type"),
    ("sigmoid", dict(label_smoothing=0.1, soft_labels=torch.ones(B)), "soft_labels"),
])
def test_bad_hyperparameters(name, hp, match):
    inputs, _, base = extreme(name, 1.0)
    with pytest.raises(ValueError, match=match):
        L.get(name)(**inputs, **{**base, **hp})


def test_listwise_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        L.infonca(logps=torch.zeros(B), ref_logps=torch.zeros(B), rewards=torch.zeros(B))


def test_imports_only_torch_and_itself():
    """fastpref.losses must import without the rest of fastpref (the parent package is stubbed out)."""
    code = f"""
import sys, types
pkg = types.ModuleType("fastpref"); pkg.__path__ = [{str(ROOT / "fastpref")!r}]
sys.modules["fastpref"] = pkg
import fastpref.losses as L
others = sorted(m for m in sys.modules if m.startswith("fastpref") and not m.startswith("fastpref.losses") and m != "fastpref")
assert not others, others
print(len(L.names()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(L.names())
    for path in (ROOT / "fastpref" / "losses").glob("*.py"):
        src = path.read_text()
        assert "import fastpref" not in src and "from fastpref" not in src and "from .." not in src, path
