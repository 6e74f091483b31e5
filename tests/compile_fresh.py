"""torch.compile as a new user calls it: default (inductor) backend, in a fresh interpreter, before any eager call.

Run by tests/test_compile_fresh.py in ONE subprocess (inductor is slow to start; the cases share its start-up).
Each case compiles first, then computes the same thing eagerly, and prints one JSON line:
{"case", "fullgraph", "graph_breaks", "value_err", "grad_err", "seconds"} (errors relative to the eager values),
or {"case", "error"} when it failed. Nothing of fastpref runs eagerly before the first compiled call.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

import fastpref
from fastpref.nn import PreferenceLoss

V, D = 48, 16


def _err(a, b) -> float:
    """max |a − b| / max(1, |b|) over pairs of tensors; inf when only one of a pair is None."""
    def one(x, y):
        if x is None or y is None:
            return 0.0 if x is None and y is None else float("inf")
        return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1)).item()

    return max((one(x, y) for x, y in zip(a, b, strict=True)), default=0.0)


def _values(out) -> list[torch.Tensor]:
    """The tensors (and metric values) a case returns."""
    if hasattr(out, "loss"):  # LossOutput
        return [out.loss, out.losses, *(torch.as_tensor(v) for v in out.metrics.values())]
    return [out]


def run_case(name: str, fn, inputs: list[torch.Tensor], fullgraph: bool = True, grad_of=None) -> None:
    """Compile ``fn`` (inductor), run it and its backward on copies of ``inputs``; compare with eager ``fn``."""
    counters.clear()
    start = time.perf_counter()
    try:
        compiled = torch.compile(fn, fullgraph=fullgraph)
        runs = []
        for f in (compiled, fn):  # compiled first: a fresh process has not run fastpref eagerly yet
            xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
            out = f(*xs)
            vals = _values(out)
            (vals[0] if grad_of is None else grad_of(out)).backward()
            runs.append((vals, [x.grad for x in xs if x.is_floating_point()]))
        (cv, cg), (ev, eg) = runs
        print(json.dumps(dict(case=name, fullgraph=fullgraph, graph_breaks=sum(counters["graph_break"].values()),
                              value_err=_err(cv, ev), grad_err=_err(cg, eg),
                              seconds=round(time.perf_counter() - start, 1))), flush=True)
    except Exception:  # reported, not raised: the other cases still run
        print(json.dumps(dict(case=name, error=traceback.format_exc()[-3000:])), flush=True)


def batch(S: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100  # a prompt
    return torch.randn(S, T, D, generator=g), labels


def functions(h, w, b, rh, rw, y):
    """Every public function at once; backend "auto" resolves when the op runs (FASTPREF_BACKEND picks it)."""
    st = fastpref.token_stats(h, w, y, bias=b, entropy=True, log_sum_p2=True, softcap=4.0, temperature=0.9)
    lp = fastpref.token_logprobs(h, w, y, bias=b)
    kl = fastpref.token_kl(h, w, rh, rw, y, bias=b, direction="reverse")
    kl_all = fastpref.token_kl(h, w, rh, rw)
    return (st.logp.sum() + 0.3 * st.lse.sum() - 0.2 * st.entropy.sum() + st.log_sum_p2.sum() + 0.5 * lp.sum()
            + kl.kl.sum() + kl.logp.sum() + kl.ref_logp.sum() + kl_all.kl.sum())


def training_step_case() -> None:
    """A tiny Llama's backbone + PreferenceLoss (fused, no logits) + SGD-momentum step, two steps.

    The forward (backbone and loss) is compiled with fullgraph=True; ``optimizer.step`` as torch recommends
    (fullgraph=False): torch.optim graph-breaks around the update on purpose (pytorch issue 104053).
    graph_breaks counts the forward's, optimizer_graph_breaks the step's.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    ref_logps = -torch.rand(4) * 20
    start = time.perf_counter()
    try:
        results, breaks = [], {}
        for compile_it in (True, False):
            torch.manual_seed(1)
            model = LlamaForCausalLM(cfg)
            loss_fn = PreferenceLoss("sigmoid", beta=0.5)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def forward(ids, labels, ref_logps):
                hidden = model.model(input_ids=ids).last_hidden_state
                return loss_fn(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], ref_logps=ref_logps).loss

            def step():
                opt.step()

            fwd = torch.compile(forward, fullgraph=True) if compile_it else forward
            opt_step = torch.compile(step) if compile_it else step
            losses = []
            for _ in range(2):
                counters.clear()
                loss = fwd(ids, labels, ref_logps)
                loss.backward()
                breaks["fwd"] = breaks.get("fwd", 0) + sum(counters["graph_break"].values())
                counters.clear()
                opt_step()
                breaks["step"] = breaks.get("step", 0) + sum(counters["graph_break"].values())
                opt.zero_grad()
                losses.append(loss.detach())
            results.append((losses, [p.detach().clone() for p in model.parameters()]))
        (cl, cp), (el, ep) = results
        print(json.dumps(dict(case="training_step", fullgraph=True, graph_breaks=breaks["fwd"],
                              optimizer_graph_breaks=breaks["step"], value_err=_err(cl, el), grad_err=_err(cp, ep),
                              seconds=round(time.perf_counter() - start, 1))), flush=True)
    except Exception:
        print(json.dumps(dict(case="training_step", error=traceback.format_exc()[-3000:])), flush=True)


def main() -> None:
    assert "fastpref.backends.native_backend" not in sys.modules  # fresh: no backend loaded yet
    g = torch.Generator().manual_seed(0)
    h, y = batch(3, 7, 1)
    w, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    rh, rw = torch.randn(3, 7, D + 4, generator=g), torch.randn(V, D + 4, generator=g)
    run_case("functions", functions, [h, w, b, rh, rw, y])  # first: nothing loaded, FASTPREF_BACKEND unset
    # the same compiled code on every backend that runs here (picked when the op runs, not when it is traced)
    for name in fastpref.available_backends(h.device):
        os.environ["FASTPREF_BACKEND"] = name
        run_case(f"functions[{name}]", functions, [h, w, b, rh, rw, y])
    os.environ.pop("FASTPREF_BACKEND")
    if torch.cuda.is_available():  # the GPU check: the same on CUDA tensors, every CUDA backend
        on_gpu = [x.cuda() for x in (h, w, b, rh, rw, y)]
        for name in fastpref.available_backends("cuda"):
            os.environ["FASTPREF_BACKEND"] = name
            run_case(f"functions[cuda-{name}]", functions, on_gpu)
        os.environ.pop("FASTPREF_BACKEND")

    hp, yp = batch(4, 6, 2)  # pairs: 2 chosen, then 2 rejected
    rhp = torch.randn(4, 6, D + 4, generator=g)
    pairs = PreferenceLoss({"sigmoid": 1.0, "tdpo1": 0.5}, beta=0.2)  # tdpo1: the full-vocabulary token KL
    run_case("PreferenceLoss[pairs]", lambda h, w, rh: pairs(h, w, yp, ref_hidden=rh, ref_weight=rw),
             [hp, w, rhp])
    hl, yl = batch(6, 5, 3)
    listwise = PreferenceLoss("plackett_luce", layout="list", num_responses=3, backend="torch")
    scores = torch.randn(2, 3, generator=g)
    run_case("PreferenceLoss[list]", lambda h, w: listwise(h, w, yl, ref_logps=-torch.arange(6.0), scores=scores),
             [hl, w])
    hu, yu = batch(4, 5, 4)
    unpaired = PreferenceLoss("kto", layout="unpaired")
    desirable = torch.tensor([True, False, True, True])
    run_case("PreferenceLoss[unpaired]",
             lambda h, w: unpaired(h, w, yu, ref_logps=-torch.arange(4.0), desirable=desirable, kl=0.1),
             [hu, w])
    packed = PreferenceLoss("sigmoid")
    cu = torch.tensor([0, 5, 9, 12, 18])
    hk, yk = batch(1, 20, 5)
    run_case("PreferenceLoss[packed]", lambda h, w: packed(h, w, yk, cu_seqlens=cu, ref_logps=-torch.arange(4.0)),
             [hk, w])
    training_step_case()


if __name__ == "__main__":
    main()
