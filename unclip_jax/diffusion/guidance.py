"""One model call per step: classifier-free guidance by batch doubling, and x0 clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian as g


def guided_output(model_fn, x, t_model, cond, uncond=None, guidance_scale=1.0,
                  learned_sigma: bool = False):
    """model_fn(x, t, cond), or with `uncond` the guided output uncond + s * (cond - uncond).

    Conditional and unconditional halves go through the model as one doubled batch. Guidance is
    applied to the prediction channels (eps, x0 or v: the conversions to eps are affine in the
    prediction with the same x_t, so guiding any of them is guiding eps); a learned-sigma model's
    variance channels are taken from the conditional half (GLIDE). Returns float32.
    """
    if uncond is None:
        return model_fn(x, t_model, cond).astype(jnp.float32)
    b = x.shape[0]
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t_model, t_model], axis=0),
                   both).astype(jnp.float32)
    out_c, out_u = out[:b], out[b:]
    if learned_sigma:
        (pred_c, var_c), (pred_u, _) = g.split_learned_sigma(out_c), g.split_learned_sigma(out_u)
        return jnp.concatenate([pred_u + guidance_scale * (pred_c - pred_u), var_c], axis=-1)
    return out_u + guidance_scale * (out_c - out_u)


def threshold_x0(x0, clip_x0=None, dynamic_threshold=None):
    """Static clip to [-c, c] (c = clip_x0), or Imagen's dynamic thresholding: per example,
    s = max(quantile(|x0|, p), c) with p = dynamic_threshold in (0, 1] and c = clip_x0 or 1,
    then clip to [-s, s] and rescale by c / s, so saturated pixels are pulled inside [-c, c]
    instead of piling up at the boundary."""
    if dynamic_threshold is not None:
        c = 1.0 if clip_x0 is None else clip_x0
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), c)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) * (c / s)
    if clip_x0 is not None:
        return jnp.clip(x0, -clip_x0, clip_x0)
    return x0
