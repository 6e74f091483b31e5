"""The embedded demo's starting policy: the tiny model after a short SFT warm-up (the offline trainer) on
*mixed-quality* demonstrations of the synthetic task. Most demonstrations make one systematic mistake (they
add K + 1 instead of K); the rest are right. The warmed-up policy therefore answers greedily with the mistake,
while its samples often contain the right answer: the judge (the task's verifier) can tell them apart, and the
online algorithm has to move the policy towards them. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path


def warm_up(folder: Path, *, steps: int, lr: float, correct_fraction: float, n_train: int, n_eval: int, seed: int,
            device: str, backend: str, threads: int | None, resume: bool) -> Path:
    """Run the offline trainer's SFT warm-up on the demonstrations; returns the final model folder."""
    from ..config import Config
    from ..preference import train
    from ..synthetic import demonstrations, make_task

    folder.mkdir(parents=True, exist_ok=True)
    rows, held = make_task(n_train, n_eval)
    data, held_file = folder / "demonstrations.jsonl", folder / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demonstrations(rows, 1.0 - correct_fraction, seed)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
    train(Config(output_dir=str(folder), data=str(data), eval_data=str(held_file), sft_steps=steps, sft_lr=lr,
                 steps=0, batch_size=32, max_length=32, pack_length=64, warmup_ratio=0.1, seed=seed,
                 distributed="none", device=device, backend=backend, plots=False, progress=False, save_every=0,
                 threads=threads, resume="auto" if resume else None))
    return folder / "final"
