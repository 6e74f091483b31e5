"""DeepSpeed ZeRO-3 with 2 gloo processes on CPU: the partitioned lm_head goes into the op as it is, is gathered
inside it, and two SGD steps match the single-process run (losses, updated parameters, a no-grad evaluation)."""
from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import fastpref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install -r requirements-dev.txt)")

WORLD, STEPS, LR = 2, 2, 0.5
D_IN, D, V, N = 8, 16, 83, 29


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(rank, port, model):
    """``model`` under ZeRO-3 with plain SGD, every parameter partitioned (no persistence threshold)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    import deepspeed

    # Its shared-memory all-reduce (a CPU inference speed-up) would be JIT-compiled first, for a minute or two;
    # gloo does. (The module, not the attribute deepspeed.comm.torch, which is torch itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
    return engine


def _full_state(engine):
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


# --------------------------------------------------------------------------------------------------------------------
# fastpref.token_logprobs on hidden states and the partitioned lm_head weight and bias
# --------------------------------------------------------------------------------------------------------------------
class _Toy(torch.nn.Module):
    """A body whose forward returns hidden states; lm_head is never called (its parameters go to the op)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D_IN, D)
        self.lm_head = torch.nn.Linear(D, V)

    def forward(self, x):
        return torch.tanh(self.body(x))


def _toy():
    torch.manual_seed(0)
    model = _Toy()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


def _toy_batch(rank):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return x, y


def _toy_loss(model, hidden, y):
    head = model.lm_head  # partitioned under ZeRO-3: passed as it is
    logp = fastpref.token_logprobs(hidden, head.weight, y, bias=head.bias, backend="torch")
    return -logp.sum() / N


def _toy_worker(rank, port, results):
    engine = _engine(rank, port, _toy())
    head = engine.module.lm_head
    assert head.weight.numel() == 0 and head.weight.ds_status.name == "NOT_AVAILABLE"
    x, y = _toy_batch(rank)
    losses = []
    for _ in range(STEPS):
        loss = _toy_loss(engine.module, engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    left = [head.weight.ds_status.name, head.bias.ds_status.name]  # nothing stays gathered after a step
    with torch.no_grad():
        eval_logp = fastpref.token_logprobs(engine(x), head.weight, y, bias=head.bias, backend="torch")
    left += [head.weight.ds_status.name, head.bias.ds_status.name]
    results[rank] = {"losses": losses, "left": left, "eval": eval_logp, "state": _full_state(engine)}


def test_zero3_partitioned_head_is_gathered_inside_the_op():
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_toy_worker, args=(_free_port(), results), nprocs=WORLD, start_method="spawn")
    model = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [_toy_batch(r) for r in range(WORLD)]
    losses = []
    for _ in range(STEPS):
        per_rank = [_toy_loss(model, model(x), y) for x, y in batches]
        (sum(per_rank) / WORLD).backward()  # ZeRO averages the ranks' gradients
        opt.step()
        opt.zero_grad()
        losses.append([loss.item() for loss in per_rank])
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    for rank in range(WORLD):
        r = results[rank]
        assert r["left"] == ["NOT_AVAILABLE"] * 4
        close(torch.tensor(r["losses"]), torch.tensor([step[rank] for step in losses]))
        for name, p in model.named_parameters():
            close(r["state"][name], p.detach())
        x, y = batches[rank]
        with torch.no_grad():
            close(r["eval"], fastpref.token_logprobs(model(x), model.lm_head.weight, y,
                                                     bias=model.lm_head.bias, backend="torch"))


# --------------------------------------------------------------------------------------------------------------------
# fastpref.integrations.transformers on a ZeRO-3 engine's module
# --------------------------------------------------------------------------------------------------------------------
def _hf_batch(rank):
    from hf_tiny import batch

    return batch(B=2, seed=20 + rank)


def _hf_loss(logp, labels):
    return -logp.sum() / (labels[:, 1:] != -100).sum()


def _hf_worker(rank, port, family, how, results):
    from hf_tiny import tiny_model

    from fastpref.integrations import transformers as fi

    engine = _engine(rank, port, tiny_model(family))
    hf = engine.module
    head = hf.get_output_embeddings().weight
    assert head.numel() == 0 and head.ds_status.name == "NOT_AVAILABLE"
    ids, labels, am = _hf_batch(rank)
    losses = []
    if how == "patched":  # the model's forward returns log-probs; the engine's forward runs it
        fi.patch_causal_lm(hf, backend="torch")
    for _ in range(STEPS):
        if how == "patched":
            logp = engine(input_ids=ids, labels=labels, attention_mask=am).log_probs
        else:  # the entry point on the engine's module, outside the engine's forward
            logp = fi.token_logprobs(hf, ids, labels, am, backend="torch")
        loss = _hf_loss(logp, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    results[rank] = {"losses": losses, "left": head.ds_status.name, "state": _full_state(engine)}


@pytest.mark.parametrize("family,how", [("llama", "direct"), ("llama", "patched"), ("gpt2", "direct")])
def test_zero3_hf_causal_lm_matches_single_process(family, how):
    from hf_tiny import tiny_model

    from fastpref.integrations import transformers as fi

    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_hf_worker, args=(_free_port(), family, how, results), nprocs=WORLD, start_method="spawn")
    model = tiny_model(family)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [_hf_batch(r) for r in range(WORLD)]
    losses = []
    for _ in range(STEPS):
        per_rank = [_hf_loss(fi.token_logprobs(model, ids, labels, am, backend="torch"), labels)
                    for ids, labels, am in batches]
        (sum(per_rank) / WORLD).backward()
        opt.step()
        opt.zero_grad()
        losses.append([loss.item() for loss in per_rank])
    for rank in range(WORLD):
        r = results[rank]
        assert r["left"] == "NOT_AVAILABLE"
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor([step[rank] for step in losses]),
                                   atol=1e-5, rtol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["state"][name], p.detach(), atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")  # noqa: B023
