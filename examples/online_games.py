"""Draw docs/online-games.png: KL(π*‖π_t) to the regularised Nash policy per step for the online algorithms on
hard rock-paper-scissors (one context, π_ref = (0.5, 0.3, 0.2)), each run through the trainer's own builders,
registry losses and optimiser wrapper with exact expectations (``fastpref.train.online.game``).

    python examples/online_games.py [output.png]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastpref.train.online import game as G

BETA = 0.05  # the regularisation of every algorithm here: online IPO's β, Nash-MD's β, INPO's τ
STEPS = 300


def curves() -> dict[str, list[float]]:
    """{label: KL(π*_β‖π_t) for t = 0..STEPS} (iterative INPO: one point per round, 20 SGD steps a round)."""
    game = G.intransitive()
    star = G.regularised_nash(game, BETA)
    runs = {
        "EGPO (extragradient, fresh samples at θ½)": G.play("online_ipo", game, steps=STEPS, lr=0.1,
                                                            hparams={"beta": BETA}),
        "extragradient on the same samples": G.play("online_ipo", game, steps=STEPS, lr=0.1, hparams={"beta": BETA},
                                                    fresh=False),
        "online IPO (gradient descent)": G.play("online_ipo", game, steps=STEPS, lr=0.1, hparams={"beta": BETA},
                                                extragradient=False),
        "Nash-MD, mixture 0.5": G.play("nash_md", game, steps=STEPS, lr=0.5, hparams={"beta": BETA}),
        "Nash-MD, mixture 0.02": G.play("nash_md", game, steps=STEPS, lr=0.5, hparams={"beta": BETA}, mixture=0.02),
        "INPO (τ = β, η = 1), per round": G.play("inpo", game, steps=40, lr=1.0, inner=20,
                                                 hparams={"tau": BETA, "eta": 1.0}),
    }
    return {name: [max(G.kl(star, p), 1e-17) for p in pis] for name, pis in runs.items()}


def main(out: str = "docs/online-games.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, kl in curves().items():
        ax.semilogy(range(len(kl)), kl, label=name)
    ax.set_xlabel("step (INPO: round)")
    ax.set_ylabel("KL(π* ‖ π_t)")
    ax.set_title(f"hard rock-paper-scissors, β = {BETA}: distance to the regularised Nash policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {Path(out)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
