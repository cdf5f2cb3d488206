"""bench_conv lists the model's convolutions as they are, and times the right computations."""
import collections

import flax
import jax
import numpy as np
import torch  # noqa: F401  (in the test extra: the reference columns must be there)
from helpers.trainer import load_config

from unclip_jax.tools import bench_conv


def _tiny():
    c = load_config("bench/unet_cpu.py")
    c.model.update(image_size=16, base_channels=32, channel_mult=(1, 2), norm_groups=8)
    c.data.resolution = 16
    c.train.batch_size = 2
    c.mesh.num_devices = 1
    return c


def _kernels(params):
    """The model's 4-D conv kernel shapes, each as the convs the step runs with it: an up block's
    conv_in (`Conv(upsample=True)`) runs as four 2x2 convs over the low-res input."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = []
    for k, v in flat.items():
        if k[-1] != "kernel" or len(v.shape) != 4:
            continue
        if any(p.startswith("up_") and p.endswith("_resample") for p in k) and "conv_in" in k:
            out += [(2, 2) + tuple(v.shape[2:])] * 4
        else:
            out.append(tuple(v.shape))
    return out


def test_forward_convs_are_the_models_convolutions():
    from unclip_jax.train.trainer import build_step
    c = _tiny()
    rows = bench_conv.forward_convs(c)
    kernels = _kernels(build_step(c).abstract_state.params)
    # Every conv kernel of the model is used once per forward pass, and nothing else is a conv.
    got = collections.Counter()
    for r in rows:
        got[r["rhs_shape"]] += r["count"]
    assert got == collections.Counter(kernels)
    assert any(r["rhs_shape"][:2] == (2, 2) for r in rows)
    assert all(r["lhs_shape"][0] == 2 and r["flops"] > 0 for r in rows)
    # Only the first convolution reads data (the noisy image): the step needs no input gradient
    # there, and needs one everywhere else.
    no_dx = [r for r in rows if not r["input_grad"]]
    assert len(no_dx) == 1 and no_dx[0]["lhs_shape"][-1] == 3 and no_dx[0] is rows[0]


def test_directions_agree_with_pytorch():
    rows = bench_conv.forward_convs(_tiny())
    picked = [r for r in rows if r["rhs_shape"][0] == 3 and r["input_grad"]][:1] + \
             [r for r in rows if r["rhs_shape"][0] == 1][:1] + \
             [r for r in rows if r["rhs_shape"][0] == 2][:2]   # uneven padding: (1, 0), (0, 1)
    assert len(picked) == 4
    for row in picked:
        x, w, g = bench_conv._inputs(row)
        fns = bench_conv.ours(row)
        convert, ref = bench_conv.theirs(row)
        targs = convert(x, w, g)
        out = {d: fns[d](x, w, g) for d in bench_conv.DIRECTIONS}
        assert out["dx"].shape == x.shape and out["dw"].shape == w.shape
        for d in bench_conv.DIRECTIONS:
            np.testing.assert_allclose(np.asarray(out[d]), ref[d](*targs), rtol=1e-4, atol=2e-4)
        # dw really is d<conv(x, w), g>/dw (not, say, the forward run again).
        lin = jax.grad(lambda w: (bench_conv._conv(row)(x, w) * g).sum())(w)
        np.testing.assert_allclose(np.asarray(out["dw"]), np.asarray(lin), rtol=1e-4, atol=2e-4)


def test_benchmark_totals_weight_rows_by_count():
    r = bench_conv.benchmark(_tiny(), repeats=1)
    assert set(r["total_ms"]) == {"ours", "torch"}
    for who, total in r["total_ms"].items():
        for d in bench_conv.DIRECTIONS:
            want = sum(row["count"] * (row[f"{who}_ms"][d] or 0.0) for row in r["rows"])
            assert abs(total[d] - want) < 1e-9 and total[d] > 0
    assert r["rows"][0]["ours_ms"]["dx"] is None and r["rows"][0]["torch_ms"]["dx"] is None
    text = bench_conv.format_result(r)
    assert f"{r['total_ms']['ours']['dw']:.1f}" in text and text.count("\n") == len(r["rows"]) + 3


def test_a_stage_without_convolutions_is_named():
    import pytest
    c = load_config("prior_shapes.py")
    assert bench_conv.forward_convs(c) == []
    with pytest.raises(ValueError, match="'diffusion_prior' stage's train step has no convolutions"):
        bench_conv.benchmark(c, repeats=1)
