"""One training run over several processes, with PyTorch's own distributed stack:

    torchrun --nproc_per_node N -m virst.train ...   (same arguments as `virst train`)

- the process group from torchrun's environment: `gloo` on CPUs, `nccl` on GPUs;
- data: every optimizer step takes a global batch of samples; a `DistributedSampler`
  (per-epoch seed) decides which rank trains which, so N ranks see exactly the samples one
  process with N-fold gradient accumulation would;
- strategies: DDP for models that fit on one device, FSDP2 (`fully_shard` per transformer
  block of the Qwen2 decoder, the UMT tower and the Hiera trunk, then the root; bf16
  parameters with fp32 reduction; activation checkpointing) for virst-7b;
- checkpoints: `torch.distributed.checkpoint`, sharded, resumable on another world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from virst.errors import ConfigError

BLOCKS = ("Qwen2DecoderLayer", "UMTBlock", "MultiScaleBlock")  # LLM, UMT, Hiera blocks
STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_world(device: torch.device) -> World:
    """The process group torchrun describes in the environment (a launch of one process
    gets one too, so FSDP2 can run on a single GPU); none for a plain `virst train`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return World(dist.get_rank(), dist.get_world_size(), local)


def device_for(world: World, requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


class SampleOrder:
    """Global sample position -> shapes training video, shuffled per epoch of `size`
    videos with `DistributedSampler(seed)`; a rank owns the positions its sampler yields
    (position % world == rank), so the order does not depend on the world size."""

    def __init__(self, size: int, seed: int, world: World):
        if size % world.size:
            raise ConfigError(f"{size} training videos do not split over {world.size} ranks")
        self.size, self.seed, self.world = size, seed, world
        self._epoch, self._indices = None, None

    def _epoch_indices(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            sampler = DistributedSampler(range(self.size), num_replicas=self.world.size,
                                         rank=self.world.rank, shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
            self._epoch, self._indices = epoch, list(sampler)
        return self._indices

    def mine(self, start: int, count: int) -> list[int]:
        """This rank's sample indices among global positions start .. start + count - 1."""
        if count % self.world.size or start % self.world.size:
            raise ConfigError(f"a step of {count} samples cannot be split over "
                              f"{self.world.size} ranks: make it a multiple of {self.world.size}")
        out = []
        for pos in range(start + self.world.rank, start + count, self.world.size):
            epoch, within = divmod(pos, self.size)
            out.append(self._epoch_indices(epoch)[within // self.world.size])
        return out


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in BLOCKS]


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing of every transformer block (recomputed in backward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    wanted = set(map(id, blocks(model)))
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in wanted)


def wrap(model: nn.Module, strategy: str, world: World, *, bf16: bool = False) -> nn.Module:
    """The module the training loop calls: the model itself (one process), DDP or FSDP2.
    FSDP2 shards in place (the same object comes back); DDP returns a wrapper."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if not world.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    if getattr(getattr(model, "config", None), "initial_seg_fusion", False):
        raise ConfigError("FSDP2 with initial_seg_fusion on is not supported (its gate is a "
                          "scalar parameter FSDP2 cannot shard); use --strategy ddp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    # FSDP2 cannot shard 0-d parameters: any left stay whole on every rank
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model, mp_policy=policy, ignored_params=scalars)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    import contextlib

    if hasattr(module, "no_sync") and not enabled:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    if not world.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t)}


def from_main(obj, world: World):
    """`obj` as rank 0 has it, on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(folder, module: nn.Module, optimizer) -> None:
    """Model and optimizer state, sharded as they are, into `folder` (every rank writes its
    shards); `torch.distributed.checkpoint` reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_checkpoint(folder, module: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    # partial, for the optimizer only: parameters that never had a gradient have no state
    # in the checkpoint (the fresh optimizer's stands for them); every weight must be there
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [k for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise ConfigError(f"checkpoint {folder} does not hold {len(missing)} of this model's "
                          f"weights (e.g. {missing[0]}): it was written by another model")
    dcp.load(state, checkpoint_id=str(folder),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on the CPU (gathered from the shards; the
    collective runs on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return {k: v.detach().clone() for k, v in state.items()}
