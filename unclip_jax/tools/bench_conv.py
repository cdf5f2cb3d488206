"""Where a stage's train step spends its convolution time: every convolution, three ways, ours
against PyTorch.

  python -m unclip_jax.tools.bench_conv --config=experiments/bench/unet_cpu.py [--repeats=11] [--json=F]

Traces the stage's loss on one global batch, lists each distinct convolution of the forward pass
(with how often it runs), and times the three convolutions the train step runs for it: the
forward, the gradient w.r.t. its input (skipped where the input does not depend on the
parameters, e.g. the noisy image, as the step skips it) and the gradient w.r.t. its kernel.
Each is one jitted call of the same primitive, median of `--repeats`. With torch installed (the
test extra) the same three are timed with `aten.convolution_backward`, NCHW, for 2-D
convolutions. Totals weight each row by its count.

`bench` gives the whole step; this says which part of it differs from PyTorch. Ours and
torch's are timed in separate phases (torch's OpenMP workers spin after each call and slow XLA's
threads down if the two alternate). What it showed for the CPU bench U-Net (dated figures in
docs/cpu-performance-2026-11.md): XLA:CPU's kernel gradients are the slowest part, computed as a
convolution whose window is the whole image after transposing both operands.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.extend import core as jcore

from unclip_jax.tools.flops import _conv_flops, _sub_jaxprs

DIRECTIONS = ("fwd", "dx", "dw")


def _walk(jaxpr, tainted, mult, found):
    """Collect conv_general_dilated eqns of `jaxpr` into `found`. `tainted`: the vars that
    depend on the parameters (so the step needs the gradient w.r.t. them)."""
    for eqn in jaxpr.eqns:
        hot = [not isinstance(v, jcore.Literal) and v in tainted for v in eqn.invars]
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            params = dict(eqn.params)
            key = (lhs.shape, rhs.shape, str(lhs.dtype), repr(sorted(params.items())), hot[0])
            row = found.setdefault(key, dict(
                lhs_shape=tuple(lhs.shape), rhs_shape=tuple(rhs.shape), dtype=str(lhs.dtype),
                out_shape=tuple(eqn.outvars[0].aval.shape), params=params, input_grad=hot[0],
                count=0, flops=_conv_flops(eqn)))
            row["count"] += mult
        else:
            inner = mult * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
            for sub in _sub_jaxprs(eqn):
                if len(sub.invars) == len(eqn.invars):
                    sub_tainted = {s for s, h in zip(sub.invars, hot) if h}
                else:   # unknown calling convention: assume every input depends on the params
                    sub_tainted = set(sub.invars) if any(hot) else set()
                _walk(sub, sub_tainted, inner, found)
        if any(hot):
            tainted.update(eqn.outvars)


def forward_convs(config) -> list[dict]:
    """The distinct convolutions of `config`'s stage loss on one global batch, in order of first
    use: shapes, the primitive's params, `count` per step, forward `flops` per call, and
    `input_grad` (whether the train step differentiates w.r.t. the convolution's input)."""
    import flax.linen as nn

    from unclip_jax.train.trainer import build_step

    b = build_step(config)
    gb = int(config.train.batch_size)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), b.abstract_state.params)
    batch = {k: jax.ShapeDtypeStruct((gb,) + v.shape[1:], v.dtype) for k, v in b.example.items()}

    def loss(p, bt):
        with nn.logical_axis_rules(b.rules):
            return b.stage.loss(b.model, p, bt, jax.random.PRNGKey(0), config)[0]

    closed = jax.make_jaxpr(loss)(params, batch)
    n_param_leaves = len(jax.tree.leaves(params))
    found: dict = {}
    _walk(closed.jaxpr, set(closed.jaxpr.invars[:n_param_leaves]), 1, found)
    return list(found.values())


def _conv(row):
    return lambda x, w: jax.lax.conv_general_dilated_p.bind(x, w, **row["params"])


def ours(row) -> dict:
    """Jitted fwd / dx / dw of one row, each called as f(x, w, g) like torch's in `theirs` (dx
    is None where the step does not need it)."""
    conv = _conv(row)
    fns = {"fwd": jax.jit(lambda x, w, g: conv(x, w)),
           "dx": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
           "dw": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}
    if not row["input_grad"]:
        fns["dx"] = None
    return fns


def _torch_layout(row):
    """Our layout's order of (batch, feature, H, W) for input, kernel and output (transposing by
    it gives torch's NCHW / OIHW) and conv2d's arguments; None where the row is not a plain 2-D
    convolution that torch runs the same way. Uneven padding (the up-sampling convs' 2x2 phases)
    is applied to torch's input beforehand (`pad`, F.pad's order), with conv2d's padding 0."""
    p = row["params"]
    dn = p["dimension_numbers"]
    pads = [tuple(x) for x in p["padding"]]
    if (len(dn.lhs_spec) != 4 or p["feature_group_count"] != 1 or p["batch_group_count"] != 1
            or any(d != 1 for d in p["lhs_dilation"])):
        return None
    even = all(lo == hi for lo, hi in pads)
    return dict(lhs=tuple(dn.lhs_spec), rhs=tuple(dn.rhs_spec), out=tuple(dn.out_spec),
                stride=list(p["window_strides"]),
                padding=[lo for lo, _ in pads] if even else [0, 0],
                pad=None if even else [v for lo, hi in reversed(pads) for v in (lo, hi)],
                dilation=list(p["rhs_dilation"]))


def theirs(row):
    """(convert, fns): `convert(x, w, g)` gives torch tensors, and fns[d](*converted) the result
    of direction d in our layout (dx None where the step skips it). None if the row has no torch
    equivalent or torch is missing."""
    lay = _torch_layout(row)
    try:
        import torch
    except ImportError:
        return None
    if lay is None:
        return None
    cb = torch.ops.aten.convolution_backward
    out_ch = row["rhs_shape"][lay["rhs"][0]]
    args = ([out_ch], lay["stride"], lay["padding"], lay["dilation"], False, [0, 0], 1)

    def t(a, perm):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a), perm)))

    def back(y, spec):   # torch's NCHW / OIHW result -> our layout
        return np.transpose(y.numpy(), np.argsort(spec))

    def fwd(x, w, g):
        return back(torch.nn.functional.conv2d(x, w, None, lay["stride"], lay["padding"],
                                               lay["dilation"]), lay["out"])

    def dx(x, w, g):
        d = cb(g, x, w, *args, [True, False, False])[0]
        if lay["pad"]:   # the gradient of the unpadded input: crop torch's padded one
            wl, wh, hl, hh = lay["pad"]
            d = d[:, :, hl:d.shape[2] - hh, wl:d.shape[3] - wh]
        return back(d, lay["lhs"])

    def dw(x, w, g):
        return back(cb(g, x, w, *args, [False, True, False])[1], lay["rhs"])

    def convert(x, w, g):
        tx = t(x, lay["lhs"])
        if lay["pad"]:
            tx = torch.nn.functional.pad(tx, lay["pad"])
        return tx, t(w, lay["rhs"]), t(g, lay["out"])

    fns = {"fwd": fwd, "dx": dx if row["input_grad"] else None, "dw": dw}
    return convert, fns


def _inputs(row, seed=0):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    dt = jnp.dtype(row["dtype"])
    return (jax.random.normal(kx, row["lhs_shape"], dt),
            0.05 * jax.random.normal(kw, row["rhs_shape"], dt),
            jax.random.normal(kg, row["out_shape"], dt))


def _time_interleaved(calls: dict, repeats: int) -> dict:
    """Median ms of each (fn, args) in `calls`, timed in rounds (one call of each per round) so
    that host noise falls on all of them alike."""
    for fn, args in calls.values():   # compile and warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def benchmark(config, *, repeats: int = 11, torch_ref: bool = True) -> dict:
    """Time every row of `forward_convs(config)`; see the module docstring. All of ours first,
    then all of torch's: torch's OpenMP workers spin for a while after each call and would slow
    down XLA's threads if the two were interleaved."""
    rows = forward_convs(config)
    if not rows:
        raise ValueError(f"the {config.stage!r} stage's train step has no convolutions; "
                         "use `bench` for its step time")
    inputs = [_inputs(row) for row in rows]
    for row, (x, w, g) in zip(rows, inputs):
        ms = _time_interleaved({d: (f, (x, w, g)) for d, f in ours(row).items() if f is not None},
                               repeats)
        row["ours_ms"] = {d: ms.get(d) for d in DIRECTIONS}
    refs = [theirs(row) if torch_ref else None for row in rows]
    for row, (x, w, g), ref in zip(rows, inputs, refs):
        row["torch_ms"] = None
        if ref is not None:
            convert, fns = ref
            targs = convert(x, w, g)
            ms = _time_interleaved({d: (f, targs) for d, f in fns.items() if f is not None},
                                   repeats)
            row["torch_ms"] = {d: ms.get(d) for d in DIRECTIONS}
    total = {}
    for who in ("ours", "torch"):
        if all(row[f"{who}_ms"] is not None for row in rows):
            total[who] = {d: sum(row["count"] * (row[f"{who}_ms"][d] or 0.0) for row in rows)
                          for d in DIRECTIONS}
    for row in rows:
        row["params"] = {k: repr(v) for k, v in row["params"].items()}   # JSON-able
    return {"stage": config.stage, "rows": rows, "repeats": repeats, "total_ms": total,
            "host_allocator": host_malloc.allocator()}


def _fmt(ms: dict | None) -> str:
    if ms is None:
        return "-"
    return " / ".join("-" if ms.get(d) is None else f"{ms[d]:.2f}" for d in DIRECTIONS)


def format_result(r: dict) -> str:
    lines = [f"{'input -> output, kernel':44s} {'count':>5s} {'GFLOP':>6s}  "
             f"{'ours fwd / dx / dw ms':>22s}  {'torch fwd / dx / dw ms':>22s}"]
    for row in r["rows"]:
        shapes = (f"{'x'.join(map(str, row['lhs_shape']))} -> "
                  f"{'x'.join(map(str, row['out_shape']))}, {'x'.join(map(str, row['rhs_shape']))}")
        lines.append(f"{shapes:44s} {row['count']:5d} {row['flops'] / 1e9:6.3f}  "
                     f"{_fmt(row['ours_ms']):>22s}  {_fmt(row['torch_ms']):>22s}")
    for who, t in r["total_ms"].items():
        lines.append(f"total per step, {who}: " + ", ".join(f"{d} {t[d]:.1f}" for d in DIRECTIONS)
                     + f" = {sum(t.values()):.1f} ms")
    lines.append(f"host allocator: {r['host_allocator']}")
    return "\n".join(lines)


def main(argv):
    del argv
    from unclip_jax import console
    console.quiet_terminal()  # library INFO logging (compiles, Orbax) is not for the terminal
    try:
        r = benchmark(FLAGS.config, repeats=FLAGS.repeats, torch_ref=FLAGS.torch)
    except ValueError as e:
        raise SystemExit(f"bench_conv: {e}") from None
    console.report(format_result(r), r, FLAGS.json)


if __name__ == "__main__":
    from unclip_jax import console
    FLAGS = flags.FLAGS
    console.define_tool_flags()
    flags.DEFINE_integer("repeats", 11, "Timed calls per convolution and direction (median).")
    flags.DEFINE_bool("torch", True, "Also time PyTorch (if installed).")
    console.run_app(main)
