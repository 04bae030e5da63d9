"""How the M-step spreads over devices: Lightning strategies by name, FSDP wrapped per decoder layer."""

from __future__ import annotations

from omegaconf import DictConfig


def build_strategy(settings: DictConfig, model):
    """The ``strategy`` Trainer argument: the name as given, or an FSDPStrategy sharding per decoder layer.

    For ``fsdp`` every module class the model lists in ``_no_split_modules`` (transformers' decoder
    layers, e.g. ``Qwen2DecoderLayer``) becomes its own FSDP unit, so parameters, gradients and optimizer
    state are sharded layer by layer instead of as one flat unit.
    """
    if settings.strategy != "fsdp":
        return settings.strategy
    from lightning.pytorch.strategies import FSDPStrategy

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    return FSDPStrategy(auto_wrap_policy=layers or None, state_dict_type="full")


def is_sharded(strategy) -> bool:
    """Whether the model's weights are split over ranks (their full state dict needs a gather)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


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


def gathered_model(model, state: dict):
    """A plain copy of ``model`` holding a gathered full state dict (the LightningModule's ``model.`` keys)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return fresh
