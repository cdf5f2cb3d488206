"""Sampling with fewer steps than training (IDDPM `space_timesteps` semantics).

A respaced schedule keeps a subset of the training timesteps and recomputes betas so that its
alpha_bar at each kept step equals the training schedule's; `timestep_map` records the training
timestep of each kept index, which is what the sampler passes to the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unclip_jax.diffusion.schedules import Schedule, schedule_from_betas


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Sorted training timesteps to keep.

    "ddimN": the integer stride giving exactly N steps, starting at 0 (DDIM's spacing).
    "karloN": N steps round(i (T-1) / (N-1)), i < N (Karlo; diffusers' UnCLIPScheduler).
    "N" / N: one section, N steps evenly strided from 0 to T-1 (rounded).
    "a,b,c" / [a, b, c]: split [0, T) into equal sections (earlier ones get the remainder) and
    stride each section with its own count, e.g. "10,10,3,2,2" spends more steps near t = 0.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot get exactly {desired} steps from {num_timesteps} "
                             "with an integer stride")
        if section_counts.startswith("karlo"):
            n = int(section_counts[len("karlo"):])
            if not 2 <= n <= num_timesteps:
                raise ValueError(f"karlo spacing needs 2..{num_timesteps} steps, got {n}")
            # numpy's round (half to even) on the float64 products, as the scheduler does.
            return sorted(set(np.round(np.arange(n) * ((num_timesteps - 1) / (n - 1)))
                              .astype(int).tolist()))
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python's round, as IDDPM
            cur += stride
        start += size
    return sorted(set(steps))


def respace(schedule: Schedule, section_counts: str | int | Sequence[int]) -> Schedule:
    """A schedule over the kept steps (needs a concrete schedule: call it outside jit)."""
    # Respaced betas come from float64 sums of the float32 log(1 - beta): each is precise relative
    # to its size, so neither tiny betas near t = 0 nor betas near 1 (cosine's cap) lose digits,
    # as differencing the stored float32 alpha_bar, or 1 - float32 beta, would.
    log_ac = np.cumsum(np.asarray(schedule.log_alphas, np.float64))
    tmap = np.asarray(schedule.timestep_map)
    keep = space_timesteps(schedule.num_timesteps, section_counts)
    log_alphas = np.diff(np.concatenate([[0.0], log_ac[keep]]))
    return schedule_from_betas(-np.expm1(log_alphas), timestep_map=tmap[keep])
