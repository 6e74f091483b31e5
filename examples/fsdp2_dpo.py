"""DPO with an FSDP2-sharded model and a vocabulary-parallel variant, on CPU (gloo) or GPUs (nccl).

    torchrun --nproc_per_node 2 examples/fsdp2_dpo.py

The lm_head weight stays a sharded DTensor: fastpref gathers it inside the op, so the caller passes the
parameter as it is. The second half splits the vocabulary across ranks instead (each rank keeps its slice).
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fastpref.nn import PreferenceLoss
from fastpref.parallel import vocab_parallel_token_stats

D, V, PAIRS, T = 32, 500, 2, 12


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # same data and initial weights on every rank
    body = torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Linear(D, D), torch.nn.Tanh()).to(device)
    head = torch.nn.Linear(D, V, bias=False).to(device)
    mesh = init_device_mesh(device.type, (world,))
    fully_shard(body, mesh=mesh)
    fully_shard(head, mesh=mesh)
    tokens = torch.randint(0, V, (2 * PAIRS, T), device=device)
    labels = tokens.roll(-1, 1)
    labels[:, :4] = -100
    loss_fn = PreferenceLoss("sigmoid", beta=0.1)
    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=1e-2)
    for step in range(3):
        out = loss_fn(body(tokens), head.weight, labels, ref_logps=torch.full((2 * PAIRS,), -50.0, device=device))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"fsdp2 step {step}: loss {out.loss.item():.4f} reward acc {out.metrics['rewards/accuracies']:.2f}")

    # Vocabulary-parallel: rank r keeps rows [start, stop) of the head; results equal the full head's.
    bounds = torch.linspace(0, V, world + 1).long().tolist()
    start, stop = bounds[rank], bounds[rank + 1]
    full = torch.randn(V, D, device=device) / D**0.5
    hidden = torch.randn(2 * PAIRS * T, D, device=device)
    st = vocab_parallel_token_stats(hidden, full[start:stop], labels.reshape(-1), vocab_range=(start, stop),
                                    entropy=True)
    if rank == 0:
        print(f"vocab-parallel: mean logp {st.logp.sum().item() / (labels != -100).sum().item():.4f}, "
              f"mean entropy {st.entropy.mean().item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
