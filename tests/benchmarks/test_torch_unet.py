"""The PyTorch reference of the CPU speed check is the same network as ours: same parameter
count for the benchmarked config, same output for the same weights."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch  # in the test extra
from helpers.models import init_jit
from helpers.trainer import load_config

from benchmarks import torch_unet as bench_torch
from unclip_jax.models import decoder_model_config, model_from_config


def _flax_block_names(m):
    """Res-block names of our UNet in construction order (= the torch ModuleLists' order)."""
    mult, nrb = tuple(m.channel_mult), int(m.num_res_blocks)
    down = []
    for level in range(len(mult)):
        down += [f"down_{level}_{i}" for i in range(nrb)]
        if level != len(mult) - 1:
            down.append(f"down_{level}_resample")
    up = []
    for level in reversed(range(len(mult))):
        up += [f"up_{level}_{i}" for i in range(nrb + 1)]
        if level:
            up.append(f"up_{level}_resample")
    return down, ["mid_0", "mid_1"], up


def _load_into_torch(net, params, m):
    """Copy flax params (NHWC/HWIO, [in, out]) into the torch module (NCHW/OIHW, [out, in])."""
    p = params["unet"]

    def dense(mod, d):
        mod.weight.copy_(torch.from_numpy(np.asarray(d["Dense_0"]["kernel"]).T.copy()))
        mod.bias.copy_(torch.from_numpy(np.array(d["Dense_0"]["bias"])))

    def conv(mod, d):
        k = np.asarray(d["Conv_0"]["kernel"]).transpose(3, 2, 0, 1).copy()
        mod.weight.copy_(torch.from_numpy(k))
        mod.bias.copy_(torch.from_numpy(np.array(d["Conv_0"]["bias"])))

    def norm(mod, d):
        mod.weight.copy_(torch.from_numpy(np.array(d["scale"])))
        mod.bias.copy_(torch.from_numpy(np.array(d["bias"])))

    def res(mod, d):
        norm(mod.norm_in, d["norm_in"]), conv(mod.conv_in, d["conv_in"])
        dense(mod.emb_proj, d["emb_proj"]), norm(mod.norm_out, d["norm_out"])
        conv(mod.conv_out, d["conv_out"])
        if mod.skip is not None:
            conv(mod.skip, d["skip"])

    down, mid, up = _flax_block_names(m)
    with torch.no_grad():
        dense(net.time_fc1, p["time_fc1"]), dense(net.time_fc2, p["time_fc2"])
        conv(net.conv_in, p["conv_in"]), norm(net.norm_out, p["norm_out"])
        conv(net.conv_out, p["conv_out"])
        for mods, names in ((net.down, down), (net.mid, mid), (net.up, up)):
            assert len(mods) == len(names)
            for mod, name in zip(mods, names):
                res(mod, p[name])


def test_same_output_for_same_weights():
    m = decoder_model_config(
        dtype="float32", image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), head_channels=16, norm_groups=8, dropout=0.0,
        learn_sigma=False, clip_dim=0, text_depth=0, text_vocab=0, text_ctx=0)
    net = model_from_config(m)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([3, 700])
    params = init_jit(net, x, t)
    # Zero-init output convs would make both outputs 0: randomise every parameter (numpy: no
    # per-shape XLA programs).
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda l: l + 0.2 * rng.standard_normal(l.shape, np.float32), params)
    leaves = jax.tree.leaves(params)
    ours = np.asarray(jax.jit(net.apply)({"params": params}, x, t))

    ref = bench_torch.build(m)
    assert bench_torch.num_params(ref) == sum(l.size for l in leaves)
    _load_into_torch(ref, params, m)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                     torch.from_numpy(np.array(t))).numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours).mean() > 0.1  # a real signal, not two zero outputs
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_benchmarked_config_same_param_count():
    c = load_config("bench/unet_cpu.py")
    net = model_from_config(c.model)
    r = c.model.image_size
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, r, r, 3)),
                                             jnp.zeros((1,))))
    ours = sum(np.prod(l.shape) for l in jax.tree.leaves(flax.core.meta.unbox(shapes)))
    assert bench_torch.num_params(bench_torch.build(c.model)) == ours
