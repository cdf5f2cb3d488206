"""The analytic (jaxpr) FLOP count equals XLA's own count on matmul/conv-only models."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.tools.flops import matmul_flops


class DenseConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)          # 3x3, 3 -> 8
        x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)  # strided
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(32, use_bias=False)(x)
        return nn.Dense(10, use_bias=False)(x)


def _xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_dense_conv_flops_match_xla_and_hand_count():
    m = DenseConv()
    x = jnp.ones((4, 16, 16, 3))
    params = m.init(jax.random.PRNGKey(0), x)
    f = lambda p, x: m.apply(p, x)  # noqa: E731
    ours = matmul_flops(f, params, x)
    # SAME padding: border outputs skip the padded taps. Per dimension, conv 1 (16 wide, k3, s1,
    # pad 1/1) has 2 + 14*3 + 2 = 46 real taps; conv 2 (k3, s2, pad 0/1) has 7*3 + 2 = 23.
    hand = 2 * 4 * (8 * 3 * 46 * 46 + 16 * 8 * 23 * 23 + 8 * 8 * 16 * 32 + 32 * 10)
    assert ours == hand
    assert ours == _xla_flops(f, params, x)


def test_scan_body_counted_per_iteration():
    w = jnp.ones((8, 8))

    def f(x):
        def body(c, _):
            return c @ w, None
        return jax.lax.scan(body, x, None, length=5)[0]

    assert matmul_flops(f, jnp.ones((2, 8))) == 5 * 2 * 2 * 8 * 8


def test_upsampling_conv_counts_the_architectures_conv():
    """Conv(upsample=True) runs four 2x2 convs on the low-res input (16 taps per low-res pixel
    instead of 36); model FLOPs count the 3x3 conv of the upsampled input it computes, which is
    XLA's count for the plain path."""
    from unclip_jax.models.layers import Conv, upsample_nearest2
    x = jnp.ones((2, 4, 6, 8))
    fast, plain = Conv(16, 3, upsample=True), Conv(16, 3)
    p = fast.init(jax.random.PRNGKey(0), x)
    f_fast = lambda p, x: fast.apply(p, x)  # noqa: E731
    f_plain = lambda p, x: plain.apply(p, upsample_nearest2(x))  # noqa: E731
    # 8 and 12 wide, k3, pad 1/1: 2 + 6*3 + 2 = 22 and 2 + 10*3 + 2 = 34 real taps.
    hand = 2 * 2 * 16 * 8 * 22 * 34
    assert matmul_flops(f_fast, p, x) == hand == matmul_flops(f_plain, p, x)
    assert _xla_flops(f_plain, p, x) == hand + 2 * 8 * 12 * 16     # XLA adds the bias adds
    # What XLA runs for the fast path: four 2x2 convs, 2x2 taps less the padded border.
    assert _xla_flops(f_fast, p, x) < 0.55 * hand
