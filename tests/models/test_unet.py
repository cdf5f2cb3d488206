"""Decoder / upsampler U-Nets: shapes, zero-init, conditioning, null path, crops, GroupNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax.models import (GroupNorm, model_from_config,
                               upsampler_model_config)
from unclip_jax.parallel import DEFAULT_RULES, make_mesh

from helpers.models import (B, decoder_inputs, init_jit, rerandomise_zeros,
                            tiny_decoder_cfg)

@pytest.fixture(scope="module")
def decoder():
    model = model_from_config(tiny_decoder_cfg())
    x, t, z, tok, mask = decoder_inputs()
    params = init_jit(model, x, t, z, tok, mask, impl="threefry2x32")  # compiles faster
    return model, params, jax.jit(model.apply, static_argnames=("train",))


def test_decoder_zero_init_output_is_exactly_zero(decoder):
    _, params, apply = decoder
    out = apply({"params": params}, *decoder_inputs())
    assert out.shape == (B, 16, 16, 6)          # learned sigma: eps and v channels
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out).max()) == 0.0
    for name in ("conv_out",):
        assert float(jnp.abs(params["unet"][name]["Conv_0"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("kw,out_ch", [
    (dict(), 6),
    (dict(learn_sigma=False, text_depth=0), 3),                  # z_i only
    (dict(clip_dim=0, channel_mult=(1, 2, 2), attention_resolutions=(8, 4)), 6),  # caption only
    (dict(image_size=32, channel_mult=(1, 1, 2), num_res_blocks=2, attention_resolutions=()), 6),
])
def test_decoder_shapes_for_several_configs(kw, out_ch):
    cfg = tiny_decoder_cfg(**kw)
    model = model_from_config(cfg)
    s = cfg.image_size
    x, t, z, tok, mask = decoder_inputs(size=s)
    var = jax.eval_shape(model.init, jax.random.key(0), x, t, z, tok, mask)
    out = jax.eval_shape(model.apply, var, x, t, z, tok, mask)
    assert out.shape == (B, s, s, out_ch)
    names = set(nn.unbox(var["params"]))
    assert ("text_encoder" in names) == (cfg.text_depth > 0)
    assert ("null_image_emb" in names) == (cfg.clip_dim > 0)


def test_every_parameter_is_logically_partitioned():
    model = model_from_config(tiny_decoder_cfg())
    var = jax.eval_shape(model.init, jax.random.key(0), *decoder_inputs())
    leaves = jax.tree_util.tree_leaves(
        var["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    axes = {a for v in leaves for a in v.names if a is not None}
    assert {"conv_in", "conv_out", "heads", "vocab", "embed", "norm"} <= axes


def test_conditioning_changes_output_and_null_path_equals_dropping(decoder):
    _, params, apply = decoder
    p = {"params": rerandomise_zeros(params)}
    x, t, z, tok, mask = decoder_inputs()
    no = jnp.zeros((B,), bool)
    # Drop masks always passed as arrays so one compiled program serves every drop pattern.
    apply_d = lambda *a, drop_image_emb=no, drop_text=no: apply(  # noqa: E731
        *a, drop_image_emb=drop_image_emb, drop_text=drop_text)
    base = apply_d(p, x, t, z, tok, mask)
    assert float(jnp.abs(base).max()) > 1e-3

    def diff(a, b):   # per-example max abs difference
        return np.asarray(jnp.abs(a - b).max(axis=(1, 2, 3)))

    z2 = jax.random.normal(jax.random.key(7), z.shape)
    assert (diff(base, apply_d(p, x, t, z2, tok, mask)) > 1e-4).all()
    tok2 = (tok + 1) % 64
    assert (diff(base, apply_d(p, x, t, z, tok2, mask)) > 1e-4).all()
    # Tokens at padding positions are ignored (they take the learned padding embedding).
    tok3 = jnp.where(mask, tok, 5)
    np.testing.assert_allclose(apply_d(p, x, t, z, tok3, mask), base, atol=1e-5)

    ones = jnp.ones((B,), bool)
    np.testing.assert_allclose(apply_d(p, x, t, None, tok, mask),
                               apply_d(p, x, t, z, tok, mask, drop_image_emb=ones), atol=1e-5)
    np.testing.assert_allclose(apply_d(p, x, t, z, None, None),
                               apply_d(p, x, t, z, tok, mask, drop_text=ones), atol=1e-5)
    # Dropping is per example: only the flagged examples change.
    sel = jnp.array([True, False, True, False])
    d = diff(base, apply_d(p, x, t, z, tok, mask, drop_image_emb=sel, drop_text=sel))
    assert (d[[0, 2]] > 1e-4).all() and (d[[1, 3]] == 0).all()


def test_remat_and_bfloat16_switches(decoder):
    _, params, apply = decoder
    p = {"params": rerandomise_zeros(params)}
    inputs = decoder_inputs()
    ref = apply(p, *inputs)
    remat = model_from_config(tiny_decoder_cfg(remat=True))
    np.testing.assert_allclose(jax.jit(remat.apply)(p, *inputs), ref, atol=1e-5)
    bf16 = model_from_config(tiny_decoder_cfg(dtype="bfloat16"))
    out = jax.jit(bf16.apply)(p, *inputs)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.1


def test_dropout_is_active_only_in_training(decoder):
    model = model_from_config(tiny_decoder_cfg(dropout=0.5))   # same params as the fixture's
    inputs = decoder_inputs()
    p = {"params": rerandomise_zeros(decoder[1])}
    apply = jax.jit(model.apply, static_argnames=("train",))
    a = apply(p, *inputs, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(p, *inputs, train=True, rngs={"dropout": jax.random.key(2)})
    c = apply(p, *inputs, train=False)
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_allclose(c, decoder[2](p, *inputs), atol=1e-5)


def test_upsampler_trained_on_crops_runs_at_full_size():
    cfg = upsampler_model_config(image_size=32, base_channels=16, channel_mult=(1, 2),
                                 num_res_blocks=1, norm_groups=8)
    model = model_from_config(cfg)
    crop = jnp.zeros((2, 8, 8, 3))
    t = jnp.array([3, 900], jnp.int32)
    params = init_jit(model, crop, t, crop)
    assert "attn" not in str(jax.tree_util.tree_structure(params))
    apply = jax.jit(model.apply)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    low = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
    assert float(jnp.abs(apply({"params": params}, x, t, low)).max()) == 0.0
    p = {"params": rerandomise_zeros(params)}
    out = apply(p, x, t, low)
    assert out.shape == (2, 32, 32, 3)
    # The low-res image conditions the output (resized inside the module).
    assert float(jnp.abs(out - apply(p, x, t, -low)).max()) > 1e-4
    # Passing the low-res image already resized (as the stage does for crops) is the same.
    up = jax.image.resize(low, (2, 32, 32, 3), "linear")
    full = apply(p, x, t, up)
    np.testing.assert_allclose(full, out, atol=1e-5)


def test_groupnorm_matches_flax_groupnorm():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 7, 32))
    ours = GroupNorm(num_groups=8, epsilon=1e-5)
    ref = nn.GroupNorm(num_groups=8, epsilon=1e-5)
    pv = nn.unbox(ours.init(jax.random.key(1), x))
    k1, k2 = jax.random.split(jax.random.key(2))
    scale = 1.0 + 0.1 * jax.random.normal(k1, (32,))
    bias = 0.1 * jax.random.normal(k2, (32,))
    p = {"params": {"scale": scale, "bias": bias}}
    assert set(pv["params"]) == {"scale", "bias"}
    s = jax.random.normal(k1, (2, 32))
    sh = jax.random.normal(k2, (2, 32))
    xs = x.reshape(2, 35, 32)

    @jax.jit   # one program: op by op, every primitive would compile on its own
    def outputs(p, x, s, sh, xs):
        return (ours.apply(p, x), ref.apply(p, x), ours.apply(p, x, s, sh), ours.apply(p, xs),
                ref.apply(p, xs))
    got, want, got_ada, got_seq, want_seq = outputs(p, x, s, sh, xs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # AdaGN folded into the same multiply-add: GN(x) * (1 + s) + b.
    np.testing.assert_allclose(got_ada, want * (1 + s[:, None, None]) + sh[:, None, None],
                               atol=1e-5)
    # Sequences [B, L, C] too.
    np.testing.assert_allclose(got_seq, want_seq, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="norm_groups"):
        GroupNorm(num_groups=5).init(jax.random.key(0), x)


def test_groupnorm_gradients_match_flax_groupnorm():
    """GroupNorm's hand-written backward passes give autodiff's gradients of nn.GroupNorm (+AdaGN)
    for x, the affine parameters and the AdaGN scale/shift, in float32 and for bfloat16 inputs."""
    k = jax.random.split(jax.random.key(3), 6)
    x = 1.5 + 2.0 * jax.random.normal(k[0], (2, 6, 5, 16))
    p = {"params": {"scale": 1.0 + 0.1 * jax.random.normal(k[1], (16,)),
                    "bias": 0.1 * jax.random.normal(k[2], (16,))}}
    s, sh = 0.3 * jax.random.normal(k[3], (2, 16)), jax.random.normal(k[4], (2, 16))
    w = jax.random.normal(k[5], x.shape)     # a non-trivial cotangent
    ours, ref = GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4, epsilon=1e-5)

    def f_ours(p, x, s, sh):
        return jnp.sum(jnp.sin(ours.apply(p, x, s, sh)) * w)

    def f_ref(p, x, s, sh):
        y = ref.apply(p, x) * (1 + s[:, None, None]) + sh[:, None, None]
        return jnp.sum(jnp.sin(y) * w)

    g_ours, g_ref = jax.jit(lambda *a: (jax.grad(f_ours, argnums=(0, 1, 2, 3))(*a),
                                       jax.grad(f_ref, argnums=(0, 1, 2, 3))(*a)))(p, x, s, sh)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)
    # Second-order (a jvp of the custom backward) is not needed; bfloat16 inputs keep their dtype.
    xb = x.astype(jnp.bfloat16)
    gx, gx32 = jax.jit(lambda xb, x: (
        jax.grad(lambda x: jnp.sum(GroupNorm(4, dtype=jnp.bfloat16).apply(p, x).astype(
            jnp.float32) * w))(xb),
        jax.grad(lambda x: jnp.sum(ref.apply(p, x) * w))(x)))(xb, x)
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_allclose(gx.astype(jnp.float32), gx32, atol=0.05 * float(jnp.abs(gx32).max()))


def test_upsample_gradient_sums_each_block():
    """upsample_nearest2's hand-written backward equals autodiff of jnp.repeat's upsampling."""
    from unclip_jax.models.layers import upsample_nearest2
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    w = jax.random.normal(jax.random.key(1), (2, 6, 8, 5))
    ref = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # noqa: E731
    up, up_ref, g, g_ref = jax.jit(lambda x: (
        upsample_nearest2(x), ref(x),
        jax.grad(lambda x: jnp.sum(jnp.sin(upsample_nearest2(x)) * w))(x),
        jax.grad(lambda x: jnp.sum(jnp.sin(ref(x)) * w))(x)))(x)
    np.testing.assert_array_equal(up, up_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,dtype,tol", [((2, 4, 6, 8, 16), jnp.float32, 1e-5),
                                             ((1, 3, 5, 16, 4), jnp.float32, 1e-5),
                                             ((2, 4, 4, 8, 8), jnp.bfloat16, 3e-2)])
def test_upsample_conv_equals_conv_of_upsampled_input(shape, dtype, tol):
    """upsample_conv (four 2x2 convs on the low-res input) gives the SAME 3x3 conv of the
    nearest-upsampled input, and the same gradients for input and kernel."""
    from jax import lax
    from unclip_jax.models.layers import upsample_conv, upsample_nearest2
    n, h, w, c, o = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, c)).astype(dtype)
    k = (jax.random.normal(jax.random.key(1), (3, 3, c, o)) / 3).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (n, 2 * h, 2 * w, o)).astype(dtype)
    pad = ((1, 1), (1, 1))
    dn = ("NHWC", "HWIO", "NHWC")
    ref = lambda x, k: lax.conv_general_dilated(upsample_nearest2(x), k, (1, 1), pad,  # noqa
                                                dimension_numbers=dn)
    ours = lambda x, k: upsample_conv(x, k, (1, 1), pad,  # noqa: E731
                                      dimension_numbers=lax.conv_dimension_numbers(
                                          x.shape, k.shape, dn))
    k1 = jnp.zeros((3, 3, c, o), dtype).at[0, 2].set(1)

    @jax.jit   # one program: op by op, every primitive would compile on its own
    def both(x, k, g, k1):
        y_ref, vjp_ref = jax.vjp(ref, x, k)
        y, vjp = jax.vjp(ours, x, k)
        return y, y_ref, vjp(g), vjp_ref(g), ours(x, k1), ref(x, k1)
    y, y_ref, grads, grads_ref, y1, y1_ref = both(x, k, g, k1)
    assert y.shape == (n, 2 * h, 2 * w, o) and y.dtype == dtype
    f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
    scale = float(np.abs(f32(y_ref)).max())
    np.testing.assert_allclose(f32(y), f32(y_ref), atol=tol * scale)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(f32(a), f32(b), atol=tol * float(np.abs(f32(b)).max()))
    # Each output phase depends on its own taps: a kernel with one non-zero tap moves the result.
    np.testing.assert_allclose(f32(y1), f32(y1_ref), atol=tol)
    with pytest.raises(ValueError, match="stride-1"):
        upsample_conv(x, k, (2, 2), pad, dimension_numbers=lax.conv_dimension_numbers(
            x.shape, k.shape, dn))


def test_up_resblock_has_the_plain_parameters_and_output():
    """The BigGAN up block's conv_in (Conv(upsample=True)) keeps nn.Conv's parameter tree and
    equals the plain Conv applied after an explicit upsample (the whole up block against
    PyTorch's interpolate-then-conv: tests/benchmarks/test_torch_unet.py); bad settings are named."""
    from unclip_jax.models.layers import Conv, upsample_nearest2
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    fast = Conv(16, 3, upsample=True)
    plain = Conv(16, 3)
    p = init_jit(fast, x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(
        jnp.shape, init_jit(plain, upsample_nearest2(x)))
    p = rerandomise_zeros(p)
    np.testing.assert_allclose(fast.apply({"params": p}, x),
                               plain.apply({"params": p}, upsample_nearest2(x)), atol=1e-5)
    with pytest.raises(ValueError, match="3x3"):
        init_jit(Conv(16, 1, upsample=True), x)
    from unclip_jax.models.unet import ResBlock
    with pytest.raises(ValueError, match="resample must be None, 'up' or 'down', got 'sideways'"):
        init_jit(ResBlock(8, "sideways", norm_groups=4), x, jnp.zeros((2, 16)))


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match="attention_resolutions"):
        model_from_config(tiny_decoder_cfg(attention_resolutions=(5,)))
    with pytest.raises(ValueError, match="config.model.kind"):
        model_from_config(tiny_decoder_cfg(kind="unet"))
    with pytest.raises(ValueError, match="config.model.dtype"):
        model_from_config(tiny_decoder_cfg(dtype="float7"))


def test_sharded_over_2x2x2_mesh_matches_single_device(decoder):
    model, params, apply = decoder
    params = rerandomise_zeros(params)
    inputs = decoder_inputs(b=8, seed=3)
    ref = apply({"params": params}, *inputs)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = nn.get_partition_spec(
        jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
    p_sh = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
    b_sh = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a),
                     in_shardings=(p_sh,) + (b_sh,) * 5, out_shardings=b_sh)
        sharded = jax.device_put(params, p_sh)
        out = fn(sharded, *jax.device_put(inputs, b_sh))
    k = sharded["unet"]["down_1_0"]["conv_in"]["Conv_0"]["kernel"]
    assert k.sharding.spec == P(None, None, "fsdp", "tensor")
    assert k.addressable_shards[0].data.shape == (3, 3, 16, 32)
    assert out.sharding.spec == P(("data", "fsdp"))
    assert float(jnp.abs(ref).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_tiny_decoder_overfits_images_from_embeddings(decoder):
    """Pure-noise input, fixed caption: only z_i tells the images apart, so the loss can only fall
    far if the embedding path works; swapping embeddings then swaps the reconstructions."""
    model, params, apply = decoder
    yy, xx = np.mgrid[:16, :16]
    imgs = []
    for i, (cy, cx) in enumerate([(4, 4), (4, 11), (11, 4), (11, 11)]):
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < 12).astype(np.float32)
        color = np.eye(3)[i % 3] * (1 if i < 3 else -1)
        imgs.append(blob[..., None] * color[None, None] * 1.6 - 0.8)
    imgs = jnp.asarray(np.stack(imgs), jnp.float32)
    _, t, z, tok, mask = decoder_inputs()
    tok, mask = jnp.broadcast_to(tok[:1], tok.shape), jnp.ones_like(mask)
    t = jnp.full_like(t, 999)
    opt = optax.adam(3e-3)

    def loss_fn(p, noise, zz):
        out = model.apply({"params": p}, noise, t, zz, tok, mask)[..., :3]
        return jnp.mean((out - imgs) ** 2)

    # At -O0 (conftest): for 100 steps, compiling at -O2 costs more CPU (~9 s) than it saves.
    @jax.jit
    def step(p, s, rng):
        loss, g = jax.value_and_grad(loss_fn)(p, jax.random.normal(rng, imgs.shape), z)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    p, s = params, jax.jit(opt.init)(params)   # one program, not one per parameter shape
    losses = []
    for i in range(100):   # the loss falls ~40x by then (the assertion asks 20x)
        p, s, loss = step(p, s, jax.random.key(i))
        losses.append(float(loss))
    first, last = losses[0], np.mean(losses[-10:])
    assert first > 0.3 and last < first / 20, (first, last)
    perm = jnp.array([2, 3, 0, 1])
    noise = jax.random.normal(jax.random.key(999), imgs.shape)
    swapped = apply({"params": p}, noise, t, z[perm], tok, mask)  # the fixture's program
    assert float(jnp.mean((swapped[..., :3] - imgs[perm]) ** 2)) < first / 10


def _stack_into(scanned_like, unrolled):
    """Unrolled U-Net params -> the `scan_blocks` layout: each level's `*_scan` holds, stacked in
    order, the blocks (`res`, `attn`) that the scanned tree no longer names one by one."""
    out = {k: v for k, v in unrolled.items() if k in scanned_like}
    for k in scanned_like:
        if not k.endswith("_scan"):
            continue
        prefix = k[:-len("scan")]                       # e.g. "down_1_"
        idx = sorted(int(n[len(prefix):]) for n in unrolled
                     if n.startswith(prefix) and n[len(prefix):].isdigit()
                     and n not in scanned_like)
        stack = lambda names: jax.tree_util.tree_map(lambda *a: np.stack(a), *names)  # noqa
        out[k] = {"res": stack([unrolled[f"{prefix}{i}"] for i in idx])}
        if f"{prefix}{idx[0]}_attn" in unrolled:
            out[k]["attn"] = stack([unrolled[f"{prefix}{i}_attn"] for i in idx])
        assert scanned_like[k]["res"]["norm_in"]["scale"].shape[0] == len(idx)
    return out


def _output_and_grad(model, params, inputs):
    """The model's output and the gradient of sum(output ** 2) in one compiled program."""
    def f(p):
        out, vjp = jax.vjp(lambda q: model.apply({"params": q}, *inputs), p)
        return out, vjp(2 * out)[0]
    return jax.jit(f)(params)


def test_scanned_blocks_compute_the_same_function():
    """`scan_blocks` runs each level's same-shaped res blocks (+ attention) as one nn.scan: with
    the unrolled weights stacked into it, outputs and every gradient are the same, with and
    without remat, and the stacked leaves carry the "layers" logical axis."""
    # 16 channels: XLA:CPU at -O0 runs the scanned convolutions slowly (seconds at 32).
    # No caption encoder: the attention blocks still get context (the CLIP tokens).
    small = dict(num_res_blocks=2, base_channels=16, head_channels=16, text_depth=0)
    unrolled = model_from_config(tiny_decoder_cfg(**small))
    scanned = {r: model_from_config(tiny_decoder_cfg(scan_blocks=True, remat=r, **small))
               for r in (False, True)}
    inputs = decoder_inputs()
    # Any weights do (the same function for every weight): random ones of the init's shapes,
    # drawn in numpy, spare compiling the unrolled init.
    shapes = nn.unbox(jax.eval_shape(unrolled.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(0)
    p_u = jax.tree_util.tree_map(lambda a: jnp.asarray(
        rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]) if a.ndim > 1 else 10),
        a.dtype), shapes)
    # remat changes no parameter: one init gives the scanned layout for both.
    boxed = jax.eval_shape(scanned[False].init, jax.random.key(0), *inputs)["params"]
    p_s = _stack_into(nn.unbox(boxed)["unet"], p_u["unet"])
    # down: level 0 scans blocks 0-1, level 1 none (block 0 widens, one block is left);
    # up: level 1 blocks 0-1 (block 2's skip is narrower), level 0 blocks 1-2 (block 0 narrows
    # from the level below).
    assert {k: v["res"]["norm_in"]["scale"].shape[0] for k, v in p_s.items()
            if k.endswith("_scan")} == {"down_0_scan": 2, "up_1_scan": 2, "up_0_scan": 2}
    assert "down_1_0" in p_s and "down_1_1" in p_s
    p_s = {**p_u, "unet": p_s}
    ref, g_u = _output_and_grad(unrolled, p_u, inputs)
    for remat, model in scanned.items():
        out, g_s = _output_and_grad(model, p_s, inputs)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=f"remat={remat}")
        want = {**g_u, "unet": _stack_into(g_s["unet"], g_u["unet"])}
        # float32 sums in another order: absolute error relative to each gradient's scale.
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())),
            err_msg=f"remat={remat}"), g_s, want)
    spec = nn.get_partition_spec(boxed)["unet"]["up_0_scan"]["res"]["conv_in"]["Conv_0"]["kernel"]
    assert spec[0] == "layers"


def test_cpu_blocked_attention_equals_dot_product_attention():
    # The decoder's CPU attention over blocks of 128 query rows (512 pixels: 4 blocks) against
    # jax.nn.dot_product_attention and a plain masked softmax, with masked context keys in
    # front, value and gradient; lowered for TPU, the model keeps dot_product_attention.
    from unclip_jax.models.unet import _attention, _blocked_attention
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((2, 512, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((2, 515, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(515)[None, :] >= np.array([[1], [3]]))[:, None, None, :]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(_blocked_attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(_blocked_attention(q, k, v, None), ref, atol=1e-3)  # mask matters

    def plain(q, k, v, mask):
        s = jnp.where(mask, jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8), -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)
    grads = lambda f: jax.grad(  # noqa: E731
        lambda q, k, v: (f(q, k, v, mask) ** 2).sum(), (0, 1, 2))(q, k, v)
    for f in (_attention, lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)):
        for a, b in zip(grads(f), grads(plain)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    on = lambda platform: jax.jit(_attention, static_argnums=3).trace(  # noqa: E731
        q, k, v, None).lower(lowering_platforms=(platform,)).as_text()
    assert "while" in on("cpu") and "while" not in on("tpu")
