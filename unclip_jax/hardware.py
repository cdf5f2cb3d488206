"""Accelerator facts used by benchmarks and ahead-of-time plans (vendor-published peaks)."""
from __future__ import annotations

# Dense bf16 peak FLOP/s per *chip* and HBM bytes per chip.
TPU = {
    "v4": dict(peak_flops=275e12, hbm=32 * 2**30),
    "v5e": dict(peak_flops=197e12, hbm=16 * 2**30),
    "v5p": dict(peak_flops=459e12, hbm=95 * 2**30),
    "v6e": dict(peak_flops=918e12, hbm=32 * 2**30),
}
GPU = {
    "A100": dict(peak_flops=312e12, hbm=80 * 2**30),
    "H100": dict(peak_flops=989e12, hbm=80 * 2**30),
    "H200": dict(peak_flops=989e12, hbm=141 * 2**30),
}
# jax device_kind strings -> table keys.
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
          "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def tpu_generation(topology: str) -> str:
    gen = topology.split(":")[0].lower()
    if gen not in TPU:
        raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(TPU)}")
    return gen


def chip_of_device_kind(kind: str) -> dict | None:
    """Table entry for a jax device_kind (None for CPUs and unknown devices)."""
    if kind in _KINDS:
        return TPU[_KINDS[kind]]
    for name, facts in GPU.items():
        if name in kind:
            return facts
    return None
