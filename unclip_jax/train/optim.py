"""AdamW with warmup + constant/cosine schedule, global-norm clipping, and parameter EMA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim, num_steps: int) -> optax.Schedule:
    warmup = int(optim.warmup_steps)
    lr = float(optim.lr)
    if optim.schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=float(optim.end_lr_frac))
    else:
        raise ValueError(f"optim.schedule: {optim.schedule!r} is not one of {SCHEDULES}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
    # Weight decay on matrices and conv kernels only; biases, norm scales and embeddings' 1-D
    # vectors are not decayed (standard AdamW practice; the paper does not say otherwise).
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim, num_steps)
    parts = []
    if float(optim.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay), mask=_decay_mask))
    return optax.chain(*parts)


def ema_update(ema, params, step, decay: float):
    """EMA with the usual warm-up: effective decay min(decay, (1+step)/(10+step)), so short runs
    (and the first steps of long ones) are not dominated by the random initialisation."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
