"""Registry of training stages; `config.stage` picks one by name."""
from __future__ import annotations

import importlib

from unclip_jax.stages.base import DataIterator, Stage

# name -> "module:Class"; modules are imported lazily so a stage's heavy deps load only when used.
_REGISTRY = {
    "toy": "unclip_jax.stages.toy:ToyStage",
    "clip": "unclip_jax.stages.clip:ClipStage",
    "diffusion_prior": "unclip_jax.stages.diffusion_prior:DiffusionPriorStage",
    "ar_prior": "unclip_jax.stages.ar_prior:ARPriorStage",
    "decoder": "unclip_jax.stages.decoder:DecoderStage",
    "upsampler": "unclip_jax.stages.upsampler:UpsamplerStage",
}
# The unCLIP stages, in the order a full run trains them (toy is the trainer's test stand-in);
# each also names its directory in a run's workdir.
UNCLIP_STAGES = tuple(name for name in _REGISTRY if name != "toy")


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def get_stage(name: str) -> Stage:
    if name not in _REGISTRY:
        raise ValueError(f"config.stage: unknown stage {name!r}; known stages: {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["DataIterator", "Stage", "UNCLIP_STAGES", "get_stage", "register"]
