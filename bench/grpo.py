"""One GRPO step's loss (forward + backward) on long completions: fastpref against TRL's own path.

    python -m bench.grpo --rounds 2                    # B=8, T=4096, V=32000, D=256 (CPU) -> bench/results/grpo
    python -m bench.grpo --batch 2 --seq 256 --out /tmp/grpo   # a quick look

The policy's last hidden states [B, T, D] and lm_head [V, D] are given (the backbone is the same for every path and
left out); every completion token counts. Each path computes, with gradients to the hidden states and the head,
the per-token log-probs and entropies of the sampled tokens, then TRL's default GRPO loss (``loss_type="dapo"``,
ε = 0.2, β = 0.04 with the k3 KL to precomputed reference log-probs, old-policy log-probs off by 0.1 nats):

* ``fastpref``: ``fastpref.nn.PolicyLoss("grpo", ...)`` (the fused primitive, backend "auto");
* ``trl``: TRL's ``GRPOTrainer._compute_loss`` (its formula and metrics, on a stub trainer) fed by TRL's chunked
  fused head ``trl.kernels.ChunkedLogProbFunction`` exactly as ``add_fused_lm_head`` calls it;
* ``naive`` (only with ``--naive``; B·T·V·4 bytes per logits copy, 4 GiB at the default shape): full logits →
  log_softmax → gather / entropy, then TRL's formula.

Each path runs in its own fresh process (``--rounds`` times, interleaved with the other paths): one warm-up step on a
short batch, then ``--repeats`` timed steps on the measured batch; peak memory is the growth of ``ru_maxrss`` over
the process's peak after building the inputs.
Writes ``grpo.json`` (raw rows, environment) and ``grpo.md`` (table) under ``--out``; ``python -m bench.readme``
lists them in the README's performance section (a folder's ``bench.json`` is reserved for ``python -m bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

PATHS = ("fastpref", "trl", "naive")
BETA, EPSILON = 0.04, 0.2


def _inputs(B: int, T: int, V: int, D: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():  # plausible old / reference log-probs near the policy's, without [B, T, V] logits
        from fastpref import token_logprobs

        lp = token_logprobs(hidden, weight, labels)
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return hidden, weight, labels, old, ref, adv


def _trl_stub(log_probs, entropies):
    from collections import defaultdict
    from types import SimpleNamespace

    import torch

    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                          gather_for_metrics=lambda x: x, sync_gradients=True)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (log_probs, entropies, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=BETA, loss_type="dapo",
        epsilon_low=EPSILON, epsilon_high=EPSILON, args=SimpleNamespace(delta=None, use_bias_correction_kl=True,
                                                                        steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=log_probs.shape[1], accelerator=acc,
        entropy_coef=0.0, _entropy_bonus_enabled=False, use_adaptive_entropy=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}), torch


def _trl_loss(log_probs, entropies, labels, old, ref, adv):
    from trl.trainer.grpo_trainer import GRPOTrainer

    stub, torch = _trl_stub(log_probs, entropies)
    B, T = labels.shape
    ones = torch.ones(B, T, dtype=torch.int64)
    inputs = dict(prompt_ids=ones[:, :1], prompt_mask=ones[:, :1], completion_ids=labels, completion_mask=ones,
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=torch.tensor(float(B * T)))
    return GRPOTrainer._compute_loss(stub, None, inputs)


def _step(path: str, hidden, weight, labels, old, ref, adv):
    import torch

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    B, T = labels.shape
    if path == "fastpref":
        from fastpref.nn import PolicyLoss

        loss = PolicyLoss("grpo", loss_type="dapo", epsilon=EPSILON, beta=BETA)(
            h, w, labels, advantages=adv, old_token_logps=old, ref_token_logps=ref).loss
    elif path == "trl":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        lp, ent, *_ = ChunkedLogProbFunction.apply(h.reshape(B * T, -1), w, None, labels.reshape(-1), 1.0,
                                                   _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"))
        loss = _trl_loss(lp.view(B, T), ent.view(B, T), labels, old, ref, adv)
    else:
        lsm = torch.log_softmax((h @ w.T).float(), -1)
        lp = lsm.gather(-1, labels[..., None]).squeeze(-1)
        ent = -(lsm.exp() * lsm).sum(-1)
        loss = _trl_loss(lp, ent, labels, old, ref, adv)
    loss.backward()
    return float(loss.detach()), h.grad, w.grad


def _child(path: str, B: int, T: int, V: int, D: int, repeats: int) -> dict:
    import resource

    import torch

    _step(path, *_inputs(1, 64, V, D, seed=1))  # warm-up: allocator, lazy imports, first-call costs
    inputs = _inputs(B, T, V, D)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, gh, gw = _step(path, *inputs)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(path=path, time_s=sorted(times)[len(times) // 2], times_s=times, peak_mib=(peak - base) / 1024,
                loss=loss, grad_hidden_norm=float(gh.norm()), grad_weight_norm=float(gw.norm()),
                threads=torch.get_num_threads())


def _pool(runs: list[dict]) -> dict:
    """One row per path over its rounds: median time of every timed step, largest peak, the rounds' raw rows."""
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    times = sorted(t for r in runs for t in r["times_s"])
    return dict(runs[0], time_s=times[len(times) // 2], times_s=times, peak_mib=max(r["peak_mib"] for r in runs),
                rounds=runs)


def _environment() -> dict:
    import torch

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:  # pragma: no cover
        trl_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), load_avg=os.getloadavg(), torch=torch.__version__, trl=trl_version,
                python=platform.python_version(), backend=os.environ.get("FASTPREF_BACKEND", "auto"))


def _markdown(rows: list[dict], args, env: dict) -> str:
    by = {r["path"]: r for r in rows if "error" not in r}
    lines = [f"# One GRPO step (loss + backward), B={args.batch} x T={args.seq} completion tokens, V={args.vocab}, "
             f"D={args.hidden}, CPU", "",
             f"`python -m bench.grpo --batch {args.batch} --seq {args.seq} --vocab {args.vocab} --hidden {args.hidden} "
             f"--repeats {args.repeats} --rounds {args.rounds}`; time: median (upper) and best over every timed step of every round; "
             "peak: largest growth of the process's peak RSS over its inputs.", "",
             f"Machine: {env['cpu']}, {env['cores']} cores (load average at start {env['load_avg'][0]:.1f}); "
             f"torch {env['torch']}, TRL {env['trl']}.", "",
             "| path | time (s), median | best (s) | peak memory (MiB) | loss | time / TRL | memory / TRL |",
             "|---|---|---|---|---|---|---|"]
    trl = by.get("trl")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} | | | | | |")
            continue
        ratio_t = f"{r['time_s'] / trl['time_s']:.2f}x" if trl else "-"
        ratio_m = f"{r['peak_mib'] / trl['peak_mib']:.2f}x" if trl and trl["peak_mib"] > 0 else "-"
        lines.append(f"| {r['path']} | {r['time_s']:.2f} | {min(r['times_s']):.2f} | {r['peak_mib']:.0f} | "
                     f"{r['loss']:.6f} | {ratio_t} | "
                     f"{ratio_m} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the paths K times in turn (fresh processes), pooling times: on a shared machine a slow "
                         "phase then falls on every path")
    ap.add_argument("--paths", default="fastpref,trl", help=f"comma-separated, from {PATHS}")
    ap.add_argument("--naive", action="store_true", help="also run the naive full-logits path")
    ap.add_argument("--out", default=os.path.join("bench", "results", "grpo"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        row = _child(args.child, args.batch, args.seq, args.vocab, args.hidden, args.repeats)
        print("ROW " + json.dumps(row))
        return 0
    paths = [p for p in args.paths.split(",") if p] + (["naive"] if args.naive else [])
    bad = [p for p in paths if p not in PATHS]
    if bad or min(args.repeats, args.rounds) < 1 or min(args.batch, args.seq, args.vocab, args.hidden) < 1:
        print(f"error: paths must come from {PATHS} (got {bad}); sizes, --repeats and --rounds must be >= 1",
              file=sys.stderr)
        return 2
    env = _environment()
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for path in paths:
            cmd = [sys.executable, "-m", "bench.grpo", "--child", path, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--repeats",
                   str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            row = json.loads(line[4:]) if line else dict(path=path,
                                                         error=(proc.stderr.strip().splitlines() or ["?"])[-1])
            runs[path].append(row)
            print(json.dumps(row), flush=True)
    rows = [_pool(r) for r in runs.values()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grpo.json"), "w") as f:
        json.dump(dict(args=vars(args), environment=env, rows=rows), f, indent=1)
    md = _markdown(rows, args, env)
    with open(os.path.join(args.out, "grpo.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
