"""KTO's reference point and BCO's running δ in the trainer: against TRL's trainers (FASTPREF_TEST_TRL=1), and
by definition (always)."""
import copy
import os

import pytest
import torch

from fastpref.nn import PreferenceLoss
from fastpref.train import data as D
from fastpref.train.dist import Dist
from fastpref.train.model import tiny_model
from fastpref.train.objective import Objective
from fastpref.train.synthetic import load_tokenizer, make_task
from fastpref.train.unpaired import kto_kl, mismatched_pairs

TRL = os.environ.get("FASTPREF_TEST_TRL") == "1"


def _models(vocab: int):
    policy = tiny_model(vocab, seed=0, hidden=32, layers=1, heads=2)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in ref.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    return policy, ref


def _unpaired_rows(n: int):
    rows = make_task(n, 0, seed=4)[0]
    return [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, r in enumerate(rows)]


def _our_kl(policy, ref, examples, index, tok):
    ds = D.Dataset("unpaired", examples)
    obj = lambda m: Objective(m, PreferenceLoss("kto", layout="unpaired", backend="torch"), backend="torch")  # noqa: E731
    import contextlib

    return kto_kl(obj(policy), obj(ref), ds, index, max_length=10_000, d=Dist(), device="cpu",
                  autocast=contextlib.nullcontext, packed=False, pad_id=tok.pad_token_id)


def test_mismatched_pairs_rotate_completions_by_one():
    ex = [D.Example([([10 + i], [20 + i, 3])]) for i in range(4)]
    pairs = mismatched_pairs(D.Dataset("unpaired", ex), [2, 0, 3, 1], max_length=100)
    assert pairs == [([12], [21, 3]), ([10], [22, 3]), ([13], [20, 3]), ([11], [23, 3])]


def test_kto_kl_is_the_naive_mismatched_mean():
    """z0 from full logits, the naive way, for prompt i with completion i-1."""
    tok = load_tokenizer()
    policy, ref = _models(len(tok))
    tk = D.Tokenize(tok, 64)
    ds = D.load_dataset(_unpaired_rows(5), tk, source="t")

    def naive(model, p, c):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = model(ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(lp[len(p) - 1:].sum())

    idx = [4, 1, 3, 0, 2]
    seqs = [ds.examples[i].seqs[0] for i in idx]
    gold = sum(naive(policy, seqs[i][0], seqs[i - 1][1]) - naive(ref, seqs[i][0], seqs[i - 1][1])
               for i in range(5)) / 5
    got = float(_our_kl(policy, ref, ds.examples, idx, tok))
    assert abs(got - gold) < 1e-4 * max(1.0, abs(gold))


def test_bco_running_delta_is_the_mean_of_every_reward_so_far():
    """δ after each step = mean of the implicit rewards of every example seen so far, each counted once, as
    TRL's BCOTrainer keeps it (RunningMoments.update on the batch's rewards): batches of different sizes
    (a short last batch) weigh by their size, not one batch mean per step."""
    loss = PreferenceLoss("bco", layout="unpaired", delta="running", beta=0.5, backend="torch")
    g = torch.Generator().manual_seed(0)
    seen: list[float] = []
    for S in (4, 6, 2):
        T, Dm, V = 5, 8, 11
        h, w = torch.randn(S, T, Dm, generator=g), torch.randn(V, Dm, generator=g)
        labels = torch.randint(0, V, (S, T), generator=g)
        ref = torch.randn(S, generator=g, dtype=torch.float64)
        des = torch.arange(S) % 2 == 0
        out = loss(h, w, labels, ref_logps=ref, desirable=des)
        lp = torch.log_softmax((h.double() @ w.double().T), -1).gather(-1, labels[..., None])[..., 0].sum(-1)
        seen += (0.5 * (lp - ref)).tolist()
        delta = sum(seen) / len(seen)
        x = 0.5 * (lp - ref) - delta
        gold = -torch.nn.functional.logsigmoid(torch.where(des, x, -x)).mean()
        assert abs(out.metrics["delta"] - delta) < 1e-6 * max(1.0, abs(delta))  # float32 log-probs
        assert abs(float(out.loss) - float(gold)) < 1e-5
    loss.eval()  # evaluation reads δ without updating it
    loss(h, w, labels, ref_logps=ref, desirable=des)
    assert abs(float(loss.delta_mean) - out.metrics["delta"]) < 1e-12


@pytest.mark.skipif(not TRL, reason="set FASTPREF_TEST_TRL=1 to cross-check against TRL")
def test_kto_reference_point_matches_trl_kto_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = load_tokenizer()
    ref, policy = _models(len(tok))  # this way round the KL estimate is positive
    policy0, ref0 = copy.deepcopy(policy), copy.deepcopy(ref)
    rows = _unpaired_rows(6)
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=1, learning_rate=1e-3,
                         logging_steps=1, report_to="none", seed=0, save_strategy="no", disable_tqdm=True,
                         use_cpu=True, bf16=False, max_length=64, train_sampling_strategy="sequential")
    t = trl.KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tok)
    t.train()
    trl_kl = next(h for h in t.state.log_history if "kl" in h)["kl"]
    tds = t.train_dataset
    examples = [D.Example([(list(tds[i]["prompt_ids"]), list(tds[i]["completion_ids"]))], label=bool(tds[i]["label"]))
                for i in range(len(tds))]
    ours = float(_our_kl(policy0, ref0, examples, list(range(6)), tok).clamp(min=0))
    assert trl_kl > 0, "pick models whose KL estimate is positive (the clamp would hide a mismatch)"
    assert abs(ours - trl_kl) <= 1e-5 * max(1.0, abs(trl_kl)), (ours, trl_kl)
