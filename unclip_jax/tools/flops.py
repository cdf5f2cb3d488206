"""Model FLOPs counted from the program: 2 x multiply-adds of every matmul and convolution.

MFU uses model FLOPs (what the architecture needs), not the hardware FLOPs XLA executes, which
also count rematerialisation. Counting from the traced jaxpr covers every model without per-model
formulas; training is forward + backward = 3x the forward matmul FLOPs.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core as jcore


def _dot_general_flops(eqn) -> float:
    a, b = (v.aval for v in eqn.invars[:2])
    (a_contract, _), (a_batch, _) = eqn.params["dimension_numbers"]
    contract = math.prod(a.shape[d] for d in a_contract)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2.0 * out * contract


def _valid_taps(n, k, stride, pad, lhs_dil, rhs_dil) -> int:
    """(output position, kernel tap) pairs that land on a real input element, not padding:
    what a convolution actually multiplies (and what XLA's cost analysis counts)."""
    n_dil = (n - 1) * lhs_dil + 1
    out = (n_dil + pad[0] + pad[1] - ((k - 1) * rhs_dil + 1)) // stride + 1
    pos = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * rhs_dil - pad[0]
    valid = (pos >= 0) & (pos < n_dil) & (pos % lhs_dil == 0)
    return int(valid.sum())


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    p = eqn.params
    dn = p["dimension_numbers"]
    out_shape = eqn.outvars[0].aval.shape
    batch = out_shape[dn.out_spec[0]]
    out_feat = out_shape[dn.out_spec[1]]
    in_feat = rhs.shape[dn.rhs_spec[1]]  # per feature group
    nsp = len(dn.rhs_spec) - 2
    lhs_dil = p.get("lhs_dilation") or (1,) * nsp
    rhs_dil = p.get("rhs_dilation") or (1,) * nsp
    taps = 1
    for i in range(nsp):
        taps *= _valid_taps(lhs.shape[dn.lhs_spec[2 + i]], rhs.shape[dn.rhs_spec[2 + i]],
                            p["window_strides"][i], p["padding"][i], lhs_dil[i], rhs_dil[i])
    return 2.0 * batch * out_feat * in_feat * taps


# `models.layers.upsample_conv` computes a 3x3 conv of a 2x nearest-upsampled input as four 2x2
# convs of the low-res input (2.25x fewer multiplies, same function). Model FLOPs count the
# architecture's conv there, so MFU stays comparable with a plain implementation (PyTorch's).
UPSAMPLE_CONV = "_upsample_conv_phases"


def _upsample_conv_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])     # [N, h, w, C] low-res, [3, 3, C, O]
    n, h, w, c = lhs.shape
    taps = _valid_taps(2 * h, 3, 1, (1, 1), 1, 1) * _valid_taps(2 * w, 3, 1, (1, 1), 1, 1)
    return 2.0 * n * rhs.shape[-1] * c * taps


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        if isinstance(v, jcore.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jcore.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, jcore.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jcore.Jaxpr):
                    yield x


def jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name in ("jit", "pjit") and eqn.params.get("name") == UPSAMPLE_CONV:
            total += _upsample_conv_flops(eqn)
        else:
            mult = eqn.params.get("length", 1) if name == "scan" else 1
            if name == "cond":  # count the most expensive branch
                branches = [jaxpr_matmul_flops(b.jaxpr) for b in eqn.params["branches"]]
                total += max(branches, default=0.0)
                continue
            for sub in _sub_jaxprs(eqn):
                total += mult * jaxpr_matmul_flops(sub)
    return total


def matmul_flops(fn, *args, **kwargs) -> float:
    """Matmul + conv FLOPs of one call of `fn` (args may be ShapeDtypeStructs)."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def train_flops_per_step(stage, model, config, abstract_params, abstract_batch, rules) -> float:
    """3 x forward matmul FLOPs of the stage's loss on one global batch (forward + backward)."""
    import flax.linen as nn

    def fwd(params, batch):
        with nn.logical_axis_rules(rules):
            return stage.loss(model, params, batch, jax.random.PRNGKey(0), config)[0]

    return 3.0 * matmul_flops(fwd, abstract_params, abstract_batch)


def step_model_flops(built, config) -> float:
    """Model FLOPs of one train step of `built` (trainer.build_step's result) on
    config.train.batch_size examples, from the traced program; tools.bench and tools.aot both
    report this, so their tables agree for every stage."""
    plain = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    with jax.set_mesh(built.mesh):
        return train_flops_per_step(
            built.stage, built.model, config, plain(built.abstract_state.params),
            plain(built.abstract_batch(int(config.train.batch_size))), built.rules)
