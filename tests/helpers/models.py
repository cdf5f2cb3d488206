"""Small models and inputs shared by the model tests: the tiny decoder U-Net and its inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import decoder_model_config

B = 4

# conftest compiles at LLVM -O0 (the tests mostly compile); a program the test runs hundreds of
# times asks for XLA's default optimisation back: jax.jit(f, compiler_options=OPTIMIZED).
OPTIMIZED = {"xla_backend_optimization_level": 2}


def tiny_decoder_cfg(**kw):
    c = dict(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), head_channels=32, norm_groups=8, clip_dim=16,
             text_vocab=64, text_ctx=8, text_width=32, text_depth=1, text_heads=2)
    c.update(kw)
    return decoder_model_config(**c)


def rerandomise_zeros(params, seed=0):
    """Give every all-zero parameter (zero-init output layers, biases) random values."""
    rng = np.random.default_rng(seed)   # numpy: no per-leaf XLA compiles
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype)
        if not np.any(np.asarray(p)) else p, params)


def init_jit(model, *args, impl="rbg"):
    """jit-compiled init with a key of `impl` (RBG by default; with the tests' flags the tiny
    decoder's init compiled faster with impl="threefry2x32", other models about the same)."""
    var = jax.jit(model.init)(jax.random.key(0, impl=impl), *args)
    return nn.unbox(var["params"])


def decoder_inputs(seed=1, ctx=8, clip_dim=16, size=16, b=B):
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (b, size, size, 3))
    t = jnp.array([0, 10, 500, 999] * (b // 4), jnp.int32)
    z = jax.random.normal(ks[1], (b, clip_dim))
    tok = jax.random.randint(ks[2], (b, ctx), 1, 64)
    mask = jnp.arange(ctx)[None] < jnp.array([8, 5, 3, 1] * (b // 4))[:, None]
    return x, t, z, tok, mask
