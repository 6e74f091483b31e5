"""torch.distributed plumbing: process group, DDP / FSDP2 wrapping, full state dicts, small reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Dist:
    """This process's place: rank, world size, device, and the strategy (none / ddp / fsdp)."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, t: Tensor) -> Tensor:
        """In-place all-reduce (sum); identity in a single process."""
        if self.active:
            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(mode: str, device: str) -> Dist:
    """Initialise the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if mode == "none":
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    if "RANK" not in os.environ:
        raise SystemExit(f"--distributed {mode} needs to be launched with torchrun (RANK/WORLD_SIZE are not set)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return Dist(mode, dist.get_rank(), dist.get_world_size(), dev)


def wrap(module: nn.Module, layers: list[nn.Module], d: Dist) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every decoder layer, then on the root: the root's own parameters,
    lm_head included, are unsharded during its forward, where the fused loss runs)."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    return module


def model_state(model: nn.Module, d: Dist) -> dict[str, Tensor]:
    """Full (unsharded) CPU state dict of the policy."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, Tensor], d: Dist) -> None:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def optim_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
