"""The embedded demo's starting policy: the tiny model after a short SFT warm-up (the offline trainer) on
*mixed-quality* demonstrations of the synthetic task. Most demonstrations make one systematic mistake (they
add K + 1 instead of K); the rest are right. The warmed-up policy therefore answers greedily with the mistake,
while its samples often contain the right answer: the judge (the task's verifier) can tell them apart, and the
online algorithm has to move the policy towards them. Nothing is downloaded.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .judges import synthetic_answer


def off_by_one(prompt: str) -> str:
    """The demonstrations' systematic mistake: every digit shifted by K + 1 instead of K."""
    return " ".join(str((int(d) + 1) % 10) for d in synthetic_answer(prompt))


def demonstrations(rows: list[dict], correct_fraction: float, seed: int) -> list[dict]:
    """SFT rows {prompt, chosen, rejected}: ``chosen`` (the SFT target) is the right answer with probability
    ``correct_fraction``, else the off-by-one answer."""
    rng = random.Random(seed + 31)
    out = []
    for r in rows:
        wrong = off_by_one(r["prompt"])
        demo = r["chosen"] if rng.random() < correct_fraction else wrong
        out.append({"prompt": r["prompt"], "chosen": demo, "rejected": wrong if demo == r["chosen"] else r["chosen"]})
    return out


def warm_up(folder: Path, *, steps: int, lr: float, correct_fraction: float, n_train: int, n_eval: int, seed: int,
            device: str, backend: str, threads: int | None, resume: bool) -> Path:
    """Run the offline trainer's SFT warm-up on the demonstrations; returns the final model folder."""
    from ..config import Config
    from ..loop import train
    from ..synthetic import make_task

    folder.mkdir(parents=True, exist_ok=True)
    rows, held = make_task(n_train, n_eval)
    data, held_file = folder / "demonstrations.jsonl", folder / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demonstrations(rows, correct_fraction, seed)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
    train(Config(output_dir=str(folder), data=str(data), eval_data=str(held_file), sft_steps=steps, sft_lr=lr,
                 steps=0, batch_size=32, max_length=32, pack_length=64, warmup_ratio=0.1, seed=seed,
                 distributed="none", device=device, backend=backend, plots=False, progress=False, save_every=0,
                 threads=threads, resume="auto" if resume else None))
    return folder / "final"
