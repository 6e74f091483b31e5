"""The online round loop's step accounting, on a stand-in run (no model): one optimiser step per freshly
sampled batch for online algorithms, no item twice in a step, every item once per epoch for iterative rounds."""
from types import SimpleNamespace

import pytest
import torch

from fastpref.train.online import algorithms as A
from fastpref.train.online.extragradient import ExtraGradient
from fastpref.train.online.loop import OnlineRun


class _Opt:
    """Records the learning rate of each step."""

    def __init__(self):
        self.param_groups, self.lrs = [{"lr": 0.0}], []

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        self.lrs.append(self.param_groups[0]["lr"])


class _Run(SimpleNamespace):
    """OnlineRun's step accounting over a closure that records the items of each gradient."""

    _batch_closure = OnlineRun._batch_closure
    train_step = OnlineRun.train_step
    steps_in_round = OnlineRun.steps_in_round
    training_items = OnlineRun.training_items


def _items(keys) -> list[A.Item]:
    return [A.Item([0], {"": [1]}, {"k": k}) for k in keys]


def _run(algorithm: str, batch_size: int, epochs: float, opt=None, schedule: str = "constant"):
    seen: list[list[int]] = []

    def closure(mine, n_global):
        return lambda: (seen.append([it.inputs["k"] for it in mine]), (0.0, 0.0))[1]

    cfg = SimpleNamespace(batch_size=batch_size, epochs=epochs, seed=0, lr=0.5, lr_schedule=schedule, rounds=4)
    run = _Run(cfg=cfg, d=SimpleNamespace(world=1, rank=0), alg=A.get(algorithm), opt=opt or _Opt(),
               step=0, round_step=0, t0=0.0, _closure=closure)
    return run, seen


def _train_round(run, n_items: int) -> None:
    items = _items(range(n_items))
    for _ in range(run.steps_in_round(n_items)):
        run.train_step(0, items)


@pytest.mark.parametrize("algorithm", [a.name for a in A.ALGORITHMS.values() if a.online and not a.rl])
def test_online_algorithms_take_one_step_per_sampled_batch(algorithm):
    run, seen = _run(algorithm, batch_size=32, epochs=2.0)  # --epochs does not make an online step off-policy
    _train_round(run, 20)  # 32 prompts sampled, 12 ties dropped
    assert len(seen) == 1 and sorted(seen[0]) == list(range(20))


@pytest.mark.parametrize("algorithm", [a.name for a in A.ALGORITHMS.values() if a.rl])
def test_rl_algorithms_take_epochs_steps_each_on_the_whole_fresh_batch(algorithm):
    """GRPO and its variants: every sample of every prompt in each step (--batch-size counts prompts), --epochs
    such steps per fresh batch (PPO-style), the linear decay spread over rounds × epochs steps."""
    run, seen = _run(algorithm, batch_size=4, epochs=2.0, schedule="linear")
    for _ in range(4):  # --rounds 4
        _train_round(run, 20)
    assert len(seen) == 8 and all(sorted(s) == list(range(20)) for s in seen)
    assert run.opt.lrs == pytest.approx([0.5 * (8 - k) / 8 for k in range(8)])


def test_iterative_round_trains_every_item_once_per_epoch_without_wrapping():
    run, seen = _run("sppo", batch_size=8, epochs=2.0)
    _train_round(run, 20)
    assert [len(s) for s in seen] == [8, 8, 4, 8, 8, 4]
    assert all(len(set(s)) == len(s) for s in seen)
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen[3:], [])) == list(range(20))


def test_egpo_second_gradient_is_on_fresh_samples_from_the_half_step():
    """EGPO: ∇L(θ_½) on new samples drawn after the half step, not on π_θ's batch again."""
    opt = ExtraGradient(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    run, seen = _run("online_ipo", batch_size=4, epochs=1.0, opt=opt)
    asked = []
    run.round_data = lambda r, half=False: (asked.append(half), {"items": _items(range(10, 14))})[1]
    run.train_step(0, _items(range(4)))
    assert asked == [True] and [sorted(s) for s in seen] == [[0, 1, 2, 3], [10, 11, 12, 13]]


@pytest.mark.parametrize("algorithm, sampling", [("sppo", (0.7, 0.9)), ("online_dpo", (0.9, 1.0)),
                                                 ("online_ipo", (2.0, 1.0))])
def test_real_runs_sample_as_the_papers_and_the_demo_at_one(tmp_path, algorithm, sampling):
    from fastpref.train.online.config import OnlineConfig

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    real = OnlineConfig(algorithm=algorithm, prompts=str(prompts), judge="m:f").resolved()
    assert (real.temperature, real.top_p) == sampling
    demo = OnlineConfig(algorithm=algorithm).resolved()
    assert (demo.temperature, demo.top_p) == (1.0, 1.0)
    chosen = OnlineConfig(algorithm=algorithm, prompts=str(prompts), judge="m:f", temperature=0.5).resolved()
    assert chosen.temperature == 0.5


def test_linear_schedule_warms_up_then_decays_within_an_iterative_round_and_over_an_online_run():
    run, _ = _run("sppo", batch_size=2, epochs=2.0, schedule="linear")
    _train_round(run, 10)  # 10 steps: 1 warm-up step (10%), then decay
    assert run.opt.lrs == pytest.approx([0.5 * f for f in [1.0, 9 / 9, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9,
                                                               2 / 9, 1 / 9]])
    run, _ = _run("online_dpo", batch_size=4, epochs=1.0, schedule="linear")
    for _ in range(4):  # --rounds 4 online steps: no warm-up, decay to 0 over the run
        _train_round(run, 4)
    assert run.opt.lrs == pytest.approx([0.5, 0.375, 0.25, 0.125])


def _xpo_round_2(history):
    """XPO's step of round 2 after rounds 0 and 1 (4 items each, keys 10·round + i, read back from their files):
    (the keys of the items it draws from, the keys of its batch)."""
    per_round = {k: _items(range(10 * k, 10 * k + 4)) for k in range(3)}
    run, seen = _run("xpo", batch_size=4, epochs=1.0)
    run.cfg.xpo_history, run.past_items = history, {}
    run.round_path = lambda k, half=False: k
    run.read_round = lambda k: {"items": per_round[k]}
    pool = run.training_items(2, {"items": per_round[2]})
    run.train_step(2, pool)
    return sorted(it.inputs["k"] for it in pool), sorted(seen[0])


def test_xpo_batches_are_drawn_from_the_pairs_of_every_round_so_far_as_the_paper():
    pool, batch = _xpo_round_2(None)
    assert pool == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert len(batch) == 4 and len(set(batch)) == 4 and set(batch) <= set(pool)
    assert min(batch) < 20  # items of earlier rounds are trained on again
    pool, batch = _xpo_round_2(1)  # --xpo-history 1: this round and the one before
    assert pool == [10, 11, 12, 13, 20, 21, 22, 23] and set(batch) <= set(pool)
    assert _xpo_round_2(0) == ([20, 21, 22, 23], [20, 21, 22, 23])  # TRL's XPOTrainer: the fresh batch only
