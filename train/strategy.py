"""How the M-step spreads over devices: Lightning strategies by name; ``fsdp`` is FSDP2 per decoder layer.

Lightning's own ``FSDPStrategy`` (FSDP1) refuses any accelerator but CUDA (lightning 2.6), so ``fsdp``
here is Lightning's ``ModelParallelStrategy`` with PyTorch's ``fully_shard`` (FSDP2) applied per decoder
layer in ``CausalLMModule.configure_model``: the same code shards on GPUs (NCCL) and on CPUs (gloo, tests).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig


def num_processes(settings: DictConfig) -> int:
    """Processes of the whole run: devices per node (``auto``: every visible GPU) x nodes."""
    devices = settings.devices
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        gpu = settings.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    count = len(devices) if not isinstance(devices, int) else devices
    return count * int(settings.num_nodes)


def build_strategy(settings: DictConfig):
    """The ``strategy`` Trainer argument: the name as given, or for ``fsdp`` a data-parallel-only mesh."""
    if settings.strategy != "fsdp":
        return settings.strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=num_processes(settings), tensor_parallel_size=1)


def is_sharded(strategy) -> bool:
    """Whether the model's weights are split over ranks (their full state dict needs a gather)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


def shard_model(model, mesh) -> None:
    """FSDP2: every decoder layer (the model's ``_no_split_modules`` classes) is one unit, the rest another."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state_dict(model) -> dict:
    """The sharded model's full weights on rank 0 (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_model(model, state: dict):
    """A plain, unsharded copy of ``model`` holding the full state dict ``state``."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(state)
    return fresh


def accumulation(settings: DictConfig, world_size: int) -> int:
    """Gradient-accumulation rounds that make ``global_batch_size`` from micro-batches on every device."""
    micro = int(settings.batch_size) * world_size
    total = settings.global_batch_size or micro
    rounds, rest = divmod(int(total), micro)
    if rest or rounds < 1:
        raise ValueError(
            f"config error: trainer.global_batch_size={total} must be a multiple of trainer.batch_size x "
            f"devices x nodes = {settings.batch_size} x {world_size}"
        )
    return rounds
