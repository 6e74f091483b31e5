"""Peak host memory of per-token log-probs (+ backward) of a Hugging Face causal LM: fused vs naive logits.

Each measurement runs in a fresh subprocess: build a tiny-bodied Llama with a large vocabulary (logits dominate),
run one warm-up step on a short batch, record ``ru_maxrss``, run forward + backward on the measured batch, and
report the growth of ``ru_maxrss`` (MiB). Paths:

* ``naive``: ``model(...).logits`` → ``log_softmax`` → ``gather`` (what HF / TRL ≤ 0.2x do);
* ``fused``: ``fastpref.integrations.transformers.token_logprobs`` (hidden states + lm_head, no logits);
* ``trl``:   TRL's own fused head (``trl.trainer.utils.add_fused_lm_head``), when TRL is installed.

    python -m bench.hf_memory                          # B=2, T=1024, V=32000, D=64
    python -m bench.hf_memory --batch 4 --seq 2048 --vocab 128256 --json out.json

The logits alone are B·T·V·4 bytes (2·1024·32000·4 = 250 MiB); the naive path keeps several such tensors alive.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PATHS = ("naive", "fused", "trl")


def _child(path: str, batch: int, seq: int, vocab: int, hidden: int) -> dict:
    return _children([path], batch, seq, vocab, hidden)[0]


def _children(paths: list[str], batch: int, seq: int, vocab: int, hidden: int) -> list[dict]:
    """Measure the paths one after the other in this process; each reports the growth of the process peak over
    the peak before it (so put the path expected to use less memory first)."""
    return [_one(p, batch, seq, vocab, hidden) for p in paths]


def _one(path: str, batch: int, seq: int, vocab: int, hidden: int) -> dict:
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float()

    if path == "fused":
        from fastpref.integrations.transformers import token_logprobs

        def logprobs(ids, labels):
            return token_logprobs(model, ids, labels)
    elif path == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)

        def logprobs(ids, labels):
            return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    else:
        def logprobs(ids, labels):
            lp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            lab = labels[:, 1:]
            return lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(lab == -100, 0.0)

    def step(b, t):
        ids = torch.randint(0, vocab, (b, t))
        labels = ids.clone()
        labels[:, : t // 4] = -100  # a prompt
        model.zero_grad(set_to_none=True)
        lp = logprobs(ids, labels)
        lp.sum().backward()
        return lp

    step(1, 16)  # warm-up: allocator, kernels, lazily imported modules
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step(batch, seq)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return dict(path=path, batch=batch, seq=seq, vocab=vocab, hidden=hidden,
                peak_growth_mib=(peak - base) * scale / 2**20, seconds=seconds,
                logits_mib=batch * seq * vocab * 4 / 2**20, threads=torch.get_num_threads())


def measure(path: str | list[str], batch: int = 2, seq: int = 1024, vocab: int = 32000, hidden: int = 64,
            timeout: float = 600) -> dict | list[dict]:
    """One measurement in a fresh interpreter (so that peaks of earlier runs do not hide this one); a list of
    paths is measured in one interpreter, in order (see ``_children``), and gives a list of rows."""
    fn = "_children" if isinstance(path, list) else "_child"
    code = (f"import json, bench.hf_memory as m; "
            f"print(json.dumps(m.{fn}({path!r}, {batch}, {seq}, {vocab}, {hidden})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=root,
                         env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{path}: subprocess failed\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    rows = []
    for path in a.paths.split(","):
        if path == "trl":
            import importlib.util

            if importlib.util.find_spec("trl") is None:
                print("trl: not installed, skipped")
                continue
        row = measure(path, a.batch, a.seq, a.vocab, a.hidden)
        rows.append(row)
        print(f"{path:>6}: peak growth {row['peak_growth_mib']:8.1f} MiB  ({row['seconds']:.2f} s; logits would be "
              f"{row['logits_mib']:.0f} MiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
