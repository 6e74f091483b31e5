"""Each online algorithm on a small game, through the trainer's own builders, registry losses and optimiser
wrapper (``fastpref.train.online.game``), checked against its paper's claim with exact expectations (no
sampling noise). Gold: the regularised Nash policy from mirror-prox on the policy itself, and the closed-form
optima of DPO / IPO."""
import pytest
import torch

from fastpref.train.online import algorithms as A
from fastpref.train.online import game as G


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 ops: threads only add overhead
    yield
    torch.set_num_threads(n)


def _kls(star, pis):
    return [G.kl(star, p) for p in pis]


def test_regularised_nash_gold_is_the_fixed_point():
    for game, beta in ((G.intransitive(), 0.05), (G.intransitive((0.3, 0.2, 0.4)), 0.2), (G.bradley_terry(), 0.1)):
        star = G.regularised_nash(game, beta)
        fixed = torch.softmax(game.ref.log() + torch.einsum("xab,xb->xa", game.P, star) / beta, -1)
        assert float((star - fixed).abs().max()) < 1e-12


def test_egpo_converges_in_the_last_iterate_where_online_ipo_cycles():
    """EGPO (Zhou+25): extragradient on online IPO converges in the last iterate to the β-regularised Nash
    policy; plain online IPO (gradient descent) and the extragradient look-ahead on the same samples do not
    (hard rock-paper-scissors, β = 0.05, SGD lr 0.1, 300 steps)."""
    game, beta = G.intransitive(), 0.05
    star = G.regularised_nash(game, beta)

    def run(**kw):
        return _kls(star, G.play("online_ipo", game, steps=300, lr=0.1, hparams={"beta": beta}, **kw))
    egpo = run()
    assert egpo[50] < 1e-9 and max(egpo[250:]) < 1e-12
    for kl in (run(extragradient=False), run(fresh=False)):  # online IPO; the old "EGPO" (same samples twice)
        assert min(kl[250:]) > 1e-2 and max(kl[250:]) > 2 * min(kl[250:])  # still far off, and oscillating


def test_inpo_converges_linearly_to_the_regularised_nash_policy():
    """INPO (Zhang+24): online mirror descent π_{t+1} ∝ π_t^(1−τ/η)·π_ref^(τ/η)·exp(P(y ≻ π_t)/η), one round per
    iterate, contracts KL(π*_τ‖π_t) by at least (1 − τ/η) per round (soft intransitive preferences)."""
    game, tau, eta = G.intransitive((0.3, 0.2, 0.4)), 0.2, 1.0
    star = G.regularised_nash(game, tau)
    kl = _kls(star, G.play("inpo", game, steps=25, lr=1.0, inner=20, hparams={"tau": tau, "eta": eta}))
    assert all(b <= (1 - tau / eta) * a for a, b in zip(kl, kl[1:]))
    assert kl[-1] < 1e-5


def test_nash_md_converges_to_a_neighbourhood_of_the_nash_policy_that_shrinks_with_the_mixture():
    """Nash-MD (Munos+23): the last iterate converges (no cycling) to a point near the β-regularised Nash policy,
    nearer as the mixture coefficient shrinks (the paper's bound grows with the mixture's step)."""
    game, beta = G.intransitive(), 0.1
    star = G.regularised_nash(game, beta)
    final = {}
    for m in (0.5, 0.125, 0.02):
        pis = G.play("nash_md", game, steps=400, lr=0.5, hparams={"beta": beta}, mixture=m)
        assert G.kl(pis[-2], pis[-1]) < 1e-7  # converged
        final[m] = G.kl(star, pis[-1])
    assert final[0.5] > final[0.125] > final[0.02] and final[0.02] < 1e-4 < final[0.5]


def test_sppo_win_rate_against_the_start_grows_every_round():
    """SPPO (Wu+24): each iteration's policy beats the initial policy more often (transitive preferences)."""
    game = G.bradley_terry()
    pis = G.play("sppo", game, steps=6, lr=1.0, inner=40, hparams={"beta": 0.5})
    wins = [G.win_rate(game, p, pis[0]) for p in pis]
    assert all(b > a + 0.01 for a, b in zip(wins, wins[1:]))


def test_sppo_averages_towards_the_nash_policy_while_its_last_iterate_cycles_outwards():
    """SPPO (Wu+24, Theorem 4.1) is multiplicative weights: on rock-paper-scissors (Nash: uniform) the average
    of its iterates approaches the Nash policy while the last iterate spirals away from it (no regularisation)."""
    game = G.intransitive()
    nash = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    pis = G.play("sppo", game, steps=40, lr=1.0, inner=30, hparams={"beta": 1.0}, samples=3)
    start = G.kl(nash, pis[0])
    average = [G.kl(nash, torch.stack(pis[1:t + 1]).mean(0)) for t in range(1, len(pis))]
    assert min(average[10:]) < 0.15 * start and G.kl(nash, pis[-1]) > 5 * start


def test_dno_each_iterate_beats_the_previous_one_under_general_preferences():
    """DNO (Rosset+24): monotone improvement, each iterate preferred to the one before it (soft intransitive
    preferences, no reward behind them)."""
    game = G.intransitive((0.3, 0.2, 0.4))
    pis = G.play("dno", game, steps=6, lr=0.5, inner=20, hparams={"beta": 0.5})
    assert all(G.win_rate(game, b, a) > 0.5 for a, b in zip(pis, pis[1:]))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_and_ipo_reach_their_closed_form_optimum_on_a_transitive_matrix(loss):
    """DPO (Rafailov+23): π* ∝ π_ref·exp(r/β) under Bradley-Terry; IPO (Azar+23): π* ∝ π_ref·exp(P(y ≻ π_ref)/β)."""
    game, beta = G.bradley_terry(), 0.5
    pi = G.offline_optimum(loss, game, beta=beta, steps=300, lr=5.0 if loss == "sigmoid" else 1.0)
    r = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    field = r if loss == "sigmoid" else torch.einsum("xab,xb->xa", game.P, game.ref)
    gold = torch.softmax(game.ref.log() + field / beta, -1)
    assert G.kl(gold, pi) < 1e-12


@pytest.mark.parametrize("algorithm", ["online_dpo", "xpo", "vpo", "iterative_dpo", "dno", "gpo"])
def test_every_other_preset_improves_on_a_transitive_matrix(algorithm):
    """The remaining presets, run as the trainer runs them, beat the starting policy on Bradley-Terry."""
    game, alg = G.bradley_terry(), A.get(algorithm)
    kw = dict(steps=60, lr=0.5) if alg.online else dict(steps=3, lr=0.5, inner=20, samples=min(alg.samples, 5))
    pis = G.play(algorithm, game, hparams={"beta": 0.5}, **kw)
    assert G.win_rate(game, pis[-1], pis[0]) > 0.6
