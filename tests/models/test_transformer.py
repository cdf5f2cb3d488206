"""Generic pre-LN transformer: causal / bidirectional masks, padding mask, remat, partitioning."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import Transformer

W, L, B = 32, 6, 2


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (B, L, W))
    causal = Transformer(W, depth=2, heads=4, causal=True, final_norm=True)
    var = jax.jit(causal.init)(jax.random.key(1), x)
    return x, nn.unbox(var["params"]), var


def test_causal_mask_later_tokens_never_change_earlier_outputs(setup):
    x, params, _ = setup
    apply = jax.jit(Transformer(W, 2, 4, causal=True, final_norm=True).apply)
    base = apply({"params": params}, x)
    for j in range(L):
        x2 = x.at[:, j].add(jax.random.normal(jax.random.key(j), (B, W)))
        out = apply({"params": params}, x2)
        np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-5)
        assert float(jnp.abs(out[:, j:] - base[:, j:]).min(axis=-1).max()) > 1e-4


def test_bidirectional_sees_later_tokens_and_padding_mask_hides_keys(setup):
    x, params, _ = setup
    apply = jax.jit(Transformer(W, 2, 4, causal=False, final_norm=True).apply)
    mask = jnp.array([[True] * L, [True] * 3 + [False] * (L - 3)])
    base = apply({"params": params}, x, mask)
    x2 = x.at[:, L - 1].add(jax.random.normal(jax.random.key(5), (B, W)))   # not a constant:
    # LayerNorm would cancel a uniform shift
    out = apply({"params": params}, x2, mask)
    assert float(jnp.abs(out[0, 0] - base[0, 0]).max()) > 1e-4     # sees a later token
    np.testing.assert_allclose(out[1, :3], base[1, :3], atol=1e-5)  # padded key is ignored
    with pytest.raises(ValueError, match="not divisible by heads"):
        Transformer(W, 1, 5).init(jax.random.key(0), x)


def test_remat_same_outputs_and_gradients_and_partitioned_params(setup):
    x, params, var = setup
    leaves = jax.tree_util.tree_leaves(
        var["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    names = {tuple(v.names) for v in leaves}
    assert {("embed", "heads"), ("heads", "embed"), ("embed", "mlp"), ("mlp", "embed")} <= names

    def grads(remat):
        m = Transformer(W, 2, 4, causal=True, final_norm=True, remat=remat)
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)))(params)

    (l0, g0), (l1, g1) = grads(False), grads(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g0, g1)


def _stack_blocks(params, depth):
    """Unrolled `block_{i}` params -> the scanned layout `blocks/block` ([depth, ...] leaves)."""
    blocks = [params[f"block_{i}"] for i in range(depth)]
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["blocks"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


@pytest.mark.parametrize("remat", [False, True])
def test_scan_equals_unrolled_outputs_and_gradients(setup, remat):
    x, params, _ = setup
    mask = jnp.array([[True] * L, [True] * 4 + [False] * (L - 4)])
    scanned = Transformer(W, 2, 4, causal=True, final_norm=True, scan=True, remat=remat)
    var = jax.jit(scanned.init)(jax.random.key(1), x, mask)
    # Initialised in the stacked layout, with "layers" leading every block leaf's names.
    leaves = jax.tree_util.tree_leaves(
        var["params"]["blocks"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(v.names[0] == "layers" and v.value.shape[0] == 2 for v in leaves)
    stacked = _stack_blocks(params, 2)
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
        nn.unbox(var["params"]))
    unrolled = Transformer(W, 2, 4, causal=True, final_norm=True)

    def loss(m, p):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x, mask)))

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           g1, _stack_blocks(g0, 2))


def test_kv_cache_decoding_equals_the_full_causal_pass(setup):
    # Prefill 3 positions, then one position per call: each output equals the full pass's at
    # that position, with a padded key in the prefix and remat on (as the paper configs run).
    x, params, _ = setup
    model = Transformer(W, 2, 4, causal=True, final_norm=True, remat=True)
    mask = jnp.array([[True] * L, [True, False] + [True] * (L - 2)])
    full = jax.jit(model.apply)({"params": params}, x, mask)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        lambda: model.apply({"params": params}, x, mask, decode=True, mutable=["cache"])[1]))

    @jax.jit
    def step(cache, chunk):
        return model.apply({"params": params, **cache}, chunk, mask, decode=True,
                           mutable=["cache"])

    outs = []
    for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 6)):
        out, cache = step(cache, x[:, lo:hi])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    assert int(cache["cache"]["block_0"]["attn"]["index"]) == L
