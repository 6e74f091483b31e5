"""Online mode: each algorithm's inputs are computed as its paper defines them (tiny cases, float64 gold)."""
import math
import sys
import types

import pytest
import torch

from fastpref.train.online import algorithms as A
from fastpref.train.online.extragradient import ExtraGradient
from fastpref.train.generate import generate
from fastpref.train.online.judges import JudgeError, Verifier, make_judge, synthetic_score

PROMPT = [2, 14, 6, 15, 5, 6, 7]  # "add 2 : 1 2 3"


def _reward_module(rewards: dict[str, float]) -> str:
    """A judge module ``<name>:reward`` whose reward of a completion is looked up in ``rewards``."""
    name = f"_judge_{len(sys.modules)}"
    mod = types.ModuleType(name)
    mod.reward = lambda prompts, completions: [rewards[c] for c in completions]
    mod.prefer = lambda prompts, a, b: [1 / (1 + math.exp(rewards[y] - rewards[x])) for x, y in zip(a, b)]
    sys.modules[name] = mod
    return name


def _group(texts: list[str], extra: str | None = None) -> A.Group:
    return A.Group(PROMPT, "add 2 : 1 2 3", [[10 + i, 3] for i in range(len(texts))], texts,
                   [9, 9, 3] if extra is not None else None, extra)


def _gold_p(r: list[float], tau: float) -> torch.Tensor:
    K = len(r)
    P = torch.empty(K, K, dtype=torch.float64)
    for i in range(K):
        for j in range(K):
            d = r[i] - r[j]
            P[i, j] = (1.0 if d > 0 else 0.5 if d == 0 else 0.0) if tau == 0 else 1 / (1 + math.exp(-d / tau))
    return P


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_sppo_winrates_from_a_known_judge(tau):
    r = [0.3, 1.2, -0.4, 1.2, 0.0]
    texts = [f"y{i}" for i in range(5)]
    judge = make_judge(_reward_module(dict(zip(texts, r))) + ":reward", synthetic=False, temperature=tau)
    item, _ = A.build_sppo(_group(texts), judge, {})
    P = _gold_p(r, tau)
    w = [float(sum(P[i]) / 5) for i in range(5)]  # P(y_i ≻ π_t) with y_j = y_i included (P = ½)
    assert item.seqs == {"chosen": [11, 3], "rejected": [12, 3]}  # first of the tied maxima; the minimum
    assert item.inputs["chosen_winrates"] == pytest.approx(w[1], abs=1e-12)
    assert item.inputs["rejected_winrates"] == pytest.approx(w[2], abs=1e-12)


def test_sppo_pairwise_judge_and_all_tied_group_dropped():
    r = {"a": 0.0, "b": 1.0, "c": 3.0}
    judge = make_judge("pairwise:" + _reward_module(r) + ":prefer", synthetic=False)
    item, _ = A.build_sppo(_group(["a", "b", "c"]), judge, {})
    P = _gold_p([0.0, 1.0, 3.0], 1.0)
    assert item.inputs["chosen_winrates"] == pytest.approx(float(P[2].mean()), abs=1e-12)
    assert item.inputs["rejected_winrates"] == pytest.approx(float(P[0].mean()), abs=1e-12)
    item, stats = A.build_sppo(_group(["1 2", "1 2", "0 0"]), Verifier(), {})  # all score 0 → dropped
    assert item is None and stats["tied"] == 1.0


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_gpo_scores_are_mean_skew_symmetric_differences(tau):
    """ŝ(y_i) = mean_j [s_ij − s_ji] with s_ij = logit P(y_i ≻ y_j) = (r_i − r_j)/τ (r_i − r_j at τ = 0)."""
    r = [0.5, -1.0, 2.0]
    texts = ["p", "q", "s"]
    judge = make_judge(_reward_module(dict(zip(texts, r))) + ":reward", synthetic=False, temperature=tau)
    item, _ = A.build_gpo(_group(texts), judge, {})
    scale = 1.0 / tau if tau > 0 else 1.0
    assert item.inputs["chosen_scores"] == pytest.approx(sum(2 * scale * (2.0 - x) for x in r) / 3)
    assert item.inputs["rejected_scores"] == pytest.approx(sum(2 * scale * (-1.0 - x) for x in r) / 3)


def test_dno_margin_filter():
    texts = ["3 4 5", "3 4 0", "0 0 0", "1 1"]  # verifier scores 1, 2/3, 0, 0 → win-rates .875 .625 .25 .25
    P = _gold_p([1.0, 2 / 3, 0.0, 0.0], 0.0)
    gap = float(P[0].mean() - P[2].mean())
    assert gap == pytest.approx(0.625)
    for margin, kept in ((0.0, True), (0.6, True), (0.625, False), (0.7, False)):
        item, stats = A.build_best_worst(_group(texts), Verifier(), {"margin": margin})
        assert (item is not None) == kept, margin
        assert stats["filtered"] == float(not kept)
        if kept:
            assert item.seqs == {"chosen": [10, 3], "rejected": [12, 3]} and stats["winrate_gap"] == pytest.approx(gap)
    assert A.ALGORITHMS["dno"].reference == "previous" and A.ALGORITHMS["iterative_dpo"].reference == "initial"


def test_pair_builders_roles_and_ties():
    v = Verifier()
    item, _ = A.build_pair(_group(["0 0 0", "3 4 5"]), v, {})
    assert item.seqs == {"chosen": [11, 3], "rejected": [10, 3]}
    assert A.build_pair(_group(["0 0 0", "1 1 1"]), v, {})[0] is None  # tie dropped
    item, st = A.build_nash_md(_group(["3 4 5"], extra="3 0 0"), v, {})
    assert item.seqs == {"": [10, 3]} and item.inputs == {"probability": 1.0}
    item, _ = A.build_xpo(_group(["0 4 5"], extra="3 4 5"), v, {})
    assert item.seqs == {"chosen": [9, 9, 3], "rejected": [10, 3], "ref_sample": [9, 9, 3]}
    item, _ = A.build_vpo(_group(["0 4 5", "3 4 5"], extra="1"), v, {})
    assert item.seqs == {"chosen": [11, 3], "rejected": [10, 3], "": [9, 9, 3]}
    item, _ = A.build_online_ipo(_group(["0 4 5", "3 4 5"]), v, {})
    assert item.seqs == {"": [10, 3], "other": [11, 3]} and item.inputs == {"pref_probs": 0.0}


def test_verifier_scores():
    assert synthetic_score("add 2 : 1 2 3", "3 4 5") == (1.0, True)
    assert synthetic_score("add 2 : 1 2 3", "3 0 5 7") == (0.5, False)
    with pytest.raises(JudgeError, match="synthetic verifier cannot judge"):
        synthetic_score("hello", "3")


# ------------------------------------------------------------------------------------------- models
def _tiny(seed: int):
    from fastpref.train.model import tiny_model

    return tiny_model(24, seed=seed, hidden=32, layers=1, heads=2).double().eval()


def _gold_token_logps(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log π(y_t | ...) from the full logits in float64 (the naive way)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return [float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(completion)]


def test_inpo_uses_pi_ref_and_pi_t_logps():
    policy, ref = _tiny(1), _tiny(2)
    items = [A.Item(PROMPT, {"chosen": [5, 6, 3], "rejected": [9, 3]}),
             A.Item(PROMPT[:4], {"chosen": [7, 3], "rejected": [8, 8, 8, 3]})]
    hp = {"tau": 0.1, "eta": 0.2}
    loss = A.ItemLoss({"inpo": 1.0}, hp, pad_id=0)
    assert loss.needs_ref and loss.needs_prev
    A.reference_logps(items, policy=policy, ref=ref, loss=loss, reference="initial", pad_id=0)
    for it in items:
        for role, c in it.seqs.items():
            # the primitive returns float32 log-probs
            assert it.ref[role] == pytest.approx(_gold_token_logps(ref, it.prompt, c), rel=1e-6)
            assert it.prev[role] == pytest.approx(_gold_token_logps(policy, it.prompt, c), rel=1e-6)
    # π_t moves on: the policy trains, the items keep π_t's numbers
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    got = loss(policy, items)
    for k, it in enumerate(items):
        s = {src: {r: sum(_gold_token_logps(m, it.prompt, c)) for r, c in it.seqs.items()}
             for src, m in (("pol", policy), ("ref", ref))}
        prev = {r: sum(v) for r, v in it.prev.items()}
        g = (s["pol"]["chosen"] - s["pol"]["rejected"]) - hp["tau"] / hp["eta"] * (s["ref"]["chosen"] - s["ref"]["rejected"]) \
            - (hp["eta"] - hp["tau"]) / hp["eta"] * (prev["chosen"] - prev["rejected"])
        assert float(got[k]) == pytest.approx((g - 1 / (2 * hp["eta"])) ** 2, rel=1e-5)


def _quadratic_argmin(loss_of_g) -> float:
    """argmin_g of a loss quadratic in g, from its first and second derivative at g = 0 (float64 autograd)."""
    g = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(loss_of_g(g), g, create_graph=True)
    (d2,) = torch.autograd.grad(d1, g)
    return float(-d1 / d2)


@pytest.mark.parametrize("r", [(0.4, 0.0), (0.0, 0.4), (0.2, 0.2)])
def test_inpo_target_is_the_expectation_over_bernoulli_labels(r):
    """INPO's loss is E_{label ~ Bernoulli(P)}[(g_label − 1/(2η))²], minimised at g* = (2P − 1)/(2η) for the
    item's (chosen, rejected) order; a soft judge's P must not be rounded to a hard label (nor a tie dropped)."""
    judge = make_judge(f"{_reward_module({'a': r[0], 'b': r[1]})}:reward", synthetic=False, temperature=1.0)
    item, _ = A.get("inpo").build(_group(["a", "b"]), judge, {})
    first = {(10, 3): "a", (11, 3): "b"}
    ra, rb = (r[0] if first[tuple(item.seqs[k])] == "a" else r[1] for k in ("chosen", "rejected"))
    P = 1 / (1 + math.exp(-(ra - rb)))  # P(chosen ≻ rejected) at τ = 1
    hp = {"tau": 0.1, "eta": 0.2}
    zero = torch.zeros(1, dtype=torch.float64)
    extra = {k: torch.tensor([v], dtype=torch.float64) for k, v in item.inputs.items()}

    def loss(g):
        return A.L.get("inpo")(chosen_logps=g.reshape(1), rejected_logps=zero, ref_chosen_logps=zero,
                               ref_rejected_logps=zero, prev_chosen_logps=zero, prev_rejected_logps=zero,
                               **extra, **hp).sum()
    assert _quadratic_argmin(loss) == pytest.approx((2 * P - 1) / (2 * hp["eta"]), rel=1e-9, abs=1e-12)


def test_dno_reference_is_pi_t():
    policy, ref = _tiny(1), _tiny(2)
    items = [A.Item(PROMPT, {"chosen": [5, 6, 3], "rejected": [9, 3]})]
    loss = A.ItemLoss({"sigmoid": 1.0}, {"beta": 0.1}, pad_id=0)
    A.reference_logps(items, policy=policy, ref=ref, loss=loss, reference="previous", pad_id=0)
    assert items[0].ref["chosen"] == pytest.approx(_gold_token_logps(policy, PROMPT, [5, 6, 3]), rel=1e-6)


def test_sppo_item_loss_matches_formula():
    policy = _tiny(3)
    it = A.Item(PROMPT, {"chosen": [5, 3], "rejected": [6, 6, 3]}, {"chosen_winrates": 0.8, "rejected_winrates": 0.1},
                prev={"chosen": [-1.0, -2.0], "rejected": [-0.5, -0.5, -0.25]})
    got = A.ItemLoss({"sppo": 1.0}, {"beta": 0.1}, pad_id=0)(policy, [it])
    hw = sum(_gold_token_logps(policy, PROMPT, [5, 3])) + 3.0
    hl = sum(_gold_token_logps(policy, PROMPT, [6, 6, 3])) + 1.25
    assert float(got[0]) == pytest.approx(0.5 * ((hw - 3.0) ** 2 + (hl + 4.0) ** 2), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_nash_md_mixture_distribution(beta):
    """Every sampling step's distribution ∝ π_θ^(1−β)·π_ref^β, against full forwards of both models on the
    generated prefix (left-padded prompts of different lengths; the reference runs with its own KV cache)."""
    policy, ref = _tiny(4), _tiny(5)
    prompts = [PROMPT, PROMPT[:3], [2, 15]]
    comps, scores = generate(policy, prompts, n=2, max_new_tokens=5, eos_id=None, pad_id=0, seed=7,
                             mixture=(ref, beta), output_scores=True)
    for row, comp in enumerate(comps):
        prompt = prompts[row // 2]
        seq = torch.tensor([prompt + comp])
        with torch.no_grad():
            lp = torch.log_softmax(policy(seq).logits[0].double(), -1)
            lr = torch.log_softmax(ref(seq).logits[0].double(), -1)
        for t in range(len(comp)):
            want = torch.softmax((1 - beta) * lp[len(prompt) - 1 + t] + beta * lr[len(prompt) - 1 + t], -1)
            got = torch.softmax(scores[t][row].double(), -1)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_sampling_is_reproducible_and_temperature_applies():
    policy = _tiny(6)
    a = generate(policy, [PROMPT, PROMPT[:3]], n=3, max_new_tokens=6, eos_id=3, pad_id=0, seed=11)
    b = generate(policy, [PROMPT, PROMPT[:3]], n=3, max_new_tokens=6, eos_id=3, pad_id=0, seed=11)
    assert a == b and len(a) == 6 and all(len(c) <= 6 and (3 not in c or c[-1] == 3) for c in a)
    _, scores = generate(policy, [PROMPT], max_new_tokens=1, eos_id=None, pad_id=0, temperature=0.5,
                         output_scores=True)
    with torch.no_grad():
        lp = torch.log_softmax(policy(torch.tensor([PROMPT])).logits[0, -1].double() / 0.5, -1)
    torch.testing.assert_close(torch.log_softmax(scores[0][0].double(), -1), lp, atol=1e-6, rtol=0)


def test_extragradient_step_by_hand():
    """SGD base: θ ← θ − η·∇L(θ − η·∇L(θ)) for L(θ) = ½θᵀAθ + bᵀθ."""
    A_ = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    eta = 0.1
    opt = ExtraGradient(torch.optim.SGD([theta], lr=eta))

    def closure():
        loss = 0.5 * theta @ A_ @ theta + b @ theta
        loss.backward()
        return float(loss)

    t0 = theta.detach().clone()
    opt.step(closure)
    half = t0 - eta * (A_ @ t0 + b)
    want = t0 - eta * (A_ @ half + b)
    torch.testing.assert_close(theta.detach(), want, atol=1e-15, rtol=0)


def test_extragradient_restores_the_base_state():
    """With Adam, the second step starts from θ and from Adam's state at θ (one moment update per step)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ExtraGradient(torch.optim.Adam([w], lr=0.1))
    grads = []

    def closure():
        (w ** 2).sum().backward()
        grads.append(w.grad.clone())
        return 0.0

    opt.step(closure)
    ref = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    base = torch.optim.Adam([ref], lr=0.1)
    ref.grad = grads[1]
    base.step()
    torch.testing.assert_close(w.detach(), ref.detach())
    assert int(opt.state_dict()["state"][0]["step"]) == 1


# ------------------------------------------------------------------------------------------- judges
def test_bad_judges_give_clear_errors(tmp_path):
    with pytest.raises(JudgeError, match="cannot import module"):
        make_judge("no_such_module_xyz:f", synthetic=False)
    with pytest.raises(JudgeError, match="has no attribute"):
        make_judge("math:no_such_fn", synthetic=False)
    with pytest.raises(JudgeError, match="expected 'verifier'"):
        make_judge("nonsense", synthetic=False)
    with pytest.raises(JudgeError, match="--judge is required"):
        make_judge(None, synthetic=False)
    with pytest.raises(JudgeError, match="not a sequence-classification"):
        make_judge(str(tmp_path), synthetic=False)
    name = f"_badjudge_{len(sys.modules)}"
    mod = types.ModuleType(name)
    mod.short = lambda p, c: [1.0]
    mod.nan = lambda p, c: [float("nan")] * len(c)
    mod.prob = lambda p, a, b: [1.5] * len(a)
    sys.modules[name] = mod
    with pytest.raises(JudgeError, match="returned 1 values for 2"):
        make_judge(f"{name}:short", synthetic=False).rewards(["x", "x"], ["a", "b"])
    with pytest.raises(JudgeError, match="expected finite values"):
        make_judge(f"{name}:nan", synthetic=False).rewards(["x"], ["a"])
    with pytest.raises(JudgeError, match=r"in \[0.0, 1.0\]"):
        make_judge(f"pairwise:{name}:prob", synthetic=False).prefer(["x"], ["a"], ["b"])


def test_reward_model_folder_judge(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastpref.train.synthetic import load_tokenizer

    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = make_judge(str(tmp_path), synthetic=False, temperature=1.0)
    r = judge.rewards(["add 1 : 2 3", "add 1 : 2 3"], ["3 4", "0"])
    P = judge.matrix("add 1 : 2 3", ["3 4", "0"])
    assert P[0, 1] == pytest.approx(1 / (1 + math.exp(r[1] - r[0]))) and P[0, 0] == 0.5


def test_teacher_answers_are_tokenized_as_completions_from_the_first_field_the_data_has():
    """DNO's teacher answer: 'teacher', else 'reference', else 'chosen'; EOS-terminated completion ids; a row
    without the field, or data asked for one without any, stop with a message; --no-teacher reads none."""
    from fastpref.train.online.setup import teacher_answers
    from fastpref.train.synthetic import load_tokenizer

    tok = load_tokenizer()
    rows = [("a:1", {"prompt": "add 2 : 0 4 8 7", "reference": "2 6 0 9", "chosen": "1"}),
            ("a:2", {"prompt": "add 1 : 1", "reference": "2"})]
    assert teacher_answers(rows, tok, None) == [[6, 10, 4, 13, 3], [6, 3]]
    assert teacher_answers(rows, tok, False) is None
    rows[0][1]["teacher"] = "3"
    with pytest.raises(SystemExit, match="a:2: missing field 'teacher'"):
        teacher_answers(rows, tok, None)
    plain = [("b:1", {"prompt": "add 1 : 1"})]
    assert teacher_answers(plain, tok, None) is None
    with pytest.raises(SystemExit, match="the prompts carry no teacher answer"):
        teacher_answers(plain, tok, True)
