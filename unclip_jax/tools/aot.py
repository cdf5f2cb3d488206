"""Ahead-of-time plan of a sharded train step, or of Karlo's text -> image sampling, for a TPU
topology, compiled on a CPU host.

  python -m unclip_jax.tools.aot --config=experiments/paper/decoder_64.py [--topology=v5p:4x4x4]
                           [--json=plan.json] [--mfu=0.4]
  python -m unclip_jax.aot --karlo=full --topology=v5e:2x2 [--batch=16] [--fsdp]
                           [--dtype=bfloat16] [--mfu=0.4]

Compiles the real train step (same code as training: unclip_jax.train.trainer.build_step) for the
topology through libtpu (`pip install 'jax[tpu]'` or the test extra; no TPU needed) with abstract
inputs, and reports per-chip memory against HBM, FLOPs per step and the step time implied at a
given MFU. The topology defaults to the config's `aot.topology`, so each paper config names one.

`--karlo` plans the converted-Karlo sampler instead (`karlo_plan`): `full` is
kakaobrain/karlo-v1-alpha's architecture (3.5B parameters, shapes only: no weights are read or
made), a path is a converted workdir (its karlo.json). It compiles the one text -> image program
(Karlo's preset: prior 25, decoder 25, super-res 7 steps, guidance doubling the batch) with the
batch over all chips and the weights replicated, or split over the chips with --fsdp, and
reports memory per chip and the images per second implied at the given MFU.
"""
from __future__ import annotations

import os
import time

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import jax
import numpy as np
from absl import app, flags

from unclip_jax import parallel
from unclip_jax.tools import hardware


def topology_devices(topology: str):
    # Compiling for a topology never runs on a TPU, so it need not own libtpu's one-process lock
    # (tests and other local jobs may hold it); read when libtpu loads, on the first call.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or a bad name: say which
        raise RuntimeError(
            f"cannot build TPU topology {topology!r} ({type(e).__name__}: {str(e)[:300]}); "
            "AOT needs the libtpu package (pip install 'jax[tpu]') and a name like v5p:4x4x4"
        ) from e


def _topology(topology: str):
    """(TPU generation, the topology's devices, chips, devices per chip)."""
    devices = topology_devices(topology)
    chips = len({tuple(d.coords) for d in devices})
    return hardware.tpu_generation(topology), devices, chips, len(devices) // chips


def _memory(compiled, devices_per_chip: int):
    """The plan's memory fields of a compiled program (bytes per chip: arguments + outputs -
    aliased + temporaries + code, per device, times the devices of a chip), and that figure."""
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    per_chip = per_device * devices_per_chip
    return {"memory_per_chip_bytes": int(per_chip),
            "memory_breakdown_per_device": {
                "arguments": int(mem.argument_size_in_bytes),
                "outputs": int(mem.output_size_in_bytes),
                "aliased": int(mem.alias_size_in_bytes),
                "temporaries": int(mem.temp_size_in_bytes),
                "code": int(mem.generated_code_size_in_bytes)}}, per_chip


def plan(config, topology: str | None = None, mfu: float = 0.4) -> dict:
    """Compile `config`'s train step for `topology` and return the plan's figures."""
    from unclip_jax.tools.flops import step_model_flops
    from unclip_jax.train.state import count_params
    from unclip_jax.train.trainer import build_step, validate_config

    topology = topology or config.aot.topology
    if not topology:
        raise ValueError("no topology: pass --topology or set config.aot.topology")
    gen, devices, chips, devices_per_chip = _topology(topology)
    validate_config(config, None, len(devices), 1)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    t0 = time.perf_counter()
    b = build_step(config, mesh)
    global_batch = int(config.train.batch_size)
    with jax.set_mesh(mesh):
        lowered = b.step.lower(b.abstract_state, b.abstract_batch(global_batch))
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    memory, per_chip = _memory(compiled, devices_per_chip)
    hbm = hardware.TPU[gen]["hbm"]
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    xla_flops = float(cost.get("flops", 0.0)) * len(devices)
    # Counted from the traced loss (3x forward matmuls/convs), as tools.bench does, not XLA's
    # figure, which also counts rematerialised forwards and so would overstate useful work.
    model_flops = step_model_flops(b, config)
    peak = hardware.TPU[gen]["peak_flops"] * chips
    n_params = count_params(b.abstract_state.params)
    return {
        # What was compiled, with per-leaf shardings (for tests; not reported).
        "abstract_state": b.abstract_state, "abstract_batch": b.abstract_batch(global_batch),
        "config_stage": config.stage,
        "params": n_params,
        "topology": topology,
        "chips": chips,
        "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": global_batch,
        "per_chip_batch": global_batch / chips,
        **memory,
        "hbm_per_chip_bytes": int(hbm),
        "fits": bool(per_chip <= hbm),
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "mfu_assumed": mfu,
        "step_time_at_mfu_s": model_flops / (peak * mfu) if peak else None,
        "compile_s": compile_s,
    }


def karlo_plan(source: str = "full", topology: str = "v5e:2x2", batch: int | None = None,
               fsdp: bool = False, dtype: str = "bfloat16", mfu: float = 0.4,
               fsdp_min_size: int | None = None) -> dict:
    """Compile Karlo's text -> image program (KarloPipeline's, Karlo's preset) for `topology`
    from abstract shapes and return the plan's figures. `source`: "full" (karlo-v1-alpha's
    architecture), a converted workdir or its karlo.json's {"configs", "schedulers"}; `batch`: prompts per call (default 4 per chip);
    weights and arithmetic in `dtype` (the pipeline keeps its weights in its compute dtype);
    `fsdp_min_size`: karlo.param_shardings' threshold."""
    import functools
    import json
    import types

    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unclip_jax import karlo
    from unclip_jax.models import karlo_import
    from unclip_jax.tools.flops import jaxpr_matmul_flops

    if isinstance(source, dict):    # {"configs", "schedulers"}, as karlo.json holds them
        arch, source = source, "given architecture"
    elif source == "full":
        arch = karlo_import.karlo_v1_alpha()
    else:
        with open(os.path.join(source, karlo.WORKDIR_FILE)) as f:
            arch = json.load(f)
    gen, devices, chips, devices_per_chip = _topology(topology)
    batch = int(batch or 4 * chips)
    if batch % len(devices):
        raise ValueError(f"batch {batch} must be a multiple of the {len(devices)} devices")
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1} if fsdp else {"data": -1},
                              devices=devices)
    program = karlo._Program(arch["configs"], arch["schedulers"], jnp.dtype(dtype))
    params = karlo.abstract_params(program, jnp.dtype(dtype))
    shardings = karlo.param_shardings(params, mesh, fsdp, fsdp_min_size)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params, shardings)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    ctx = program.prior.text_ctx
    tok = jax.ShapeDtypeStruct((batch, ctx), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, ctx), jnp.bool_, sharding=rows)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    s = types.SimpleNamespace(**{k: karlo.PRESET[k] for k in karlo._USED})
    fn = functools.partial(program.text_to_image_fn, s=s)
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(abstract, tok, mask, tok, mask, rng)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0

    memory, per_chip = _memory(compiled, devices_per_chip)
    hbm = hardware.TPU[gen]["hbm"]
    # Model FLOPs of the whole call (every scanned step, the guided batch doubled), counted
    # from the program just traced (global shapes; tracing it again costs seconds); the implied
    # time is at `mfu` of the chips' peak.
    flops = jaxpr_matmul_flops(traced.jaxpr.jaxpr)
    peak = hardware.TPU[gen]["peak_flops"] * chips
    call_s = flops / (peak * mfu)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return {
        "abstract_params": abstract, "karlo": source, "params": n_params, "dtype": dtype, "fsdp": bool(fsdp),
        "topology": topology, "chips": chips, "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch": batch, "per_chip_batch": batch / chips,
        "steps": {k: karlo.PRESET[k] for k in ("prior_steps", "decoder_steps",
                                               "upsampler_steps")},
        "image_size": program.out_size,
        **memory,
        "hbm_per_chip_bytes": int(hbm), "fits": bool(per_chip <= hbm),
        "model_flops_per_call": flops, "mfu_assumed": mfu,
        "call_time_at_mfu_s": call_s, "images_per_s_at_mfu": batch / call_s,
        "compile_s": compile_s,
    }


def format_karlo_plan(p: dict) -> str:
    gib = 2**30
    rows = [
        ("karlo", f"{p['karlo']} ({p['params']:,} params, {p['dtype']}, "
                  f"{'fsdp' if p['fsdp'] else 'replicated'} weights)"),
        ("topology", f"{p['topology']} ({p['chips']} chips, mesh {p['mesh']})"),
        ("batch", f"{p['batch']} prompts ({p['per_chip_batch']:g} per chip), "
                  f"{p['image_size']}px, steps {p['steps']}"),
        ("memory per chip", f"{p['memory_per_chip_bytes'] / gib:.2f} GiB of "
                            f"{p['hbm_per_chip_bytes'] / gib:.0f} GiB -> "
                            f"{'fits' if p['fits'] else 'DOES NOT FIT'}"),
        ("model FLOPs/call", f"{p['model_flops_per_call']:.3e}"),
        (f"at MFU {p['mfu_assumed']:.0%}", f"{p['call_time_at_mfu_s']:.2f} s per call, "
                                           f"{p['images_per_s_at_mfu']:.2f} images/s"),
        ("compile", f"{p['compile_s']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def format_plan(p: dict) -> str:
    gib = 2**30
    rows = [
        ("stage", p["config_stage"]), ("params", f"{p['params']:,}"),
        ("topology", f"{p['topology']} ({p['chips']} chips, mesh {p['mesh']})"),
        ("global batch", f"{p['global_batch']} ({p['per_chip_batch']:g} per chip)"),
        ("memory per chip", f"{p['memory_per_chip_bytes'] / gib:.2f} GiB of "
                            f"{p['hbm_per_chip_bytes'] / gib:.0f} GiB -> "
                            f"{'fits' if p['fits'] else 'DOES NOT FIT'}"),
        ("model FLOPs/step", f"{p['model_flops_per_step']:.3e} (XLA: {p['xla_flops_per_step']:.3e})"),
        (f"step time @ MFU {p['mfu_assumed']:.0%}", f"{p['step_time_at_mfu_s']:.3f} s"),
        ("compile", f"{p['compile_s']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv):
    del argv
    from unclip_jax import console
    console.quiet_terminal()  # libtpu's and XLA's INFO logging is not for the terminal
    if FLAGS.karlo:
        p = karlo_plan(FLAGS.karlo, FLAGS.topology or "v5e:2x2", FLAGS.batch, FLAGS.fsdp,
                       FLAGS.dtype, FLAGS.mfu)
        p.pop("abstract_params")
        console.report(format_karlo_plan(p), p, FLAGS.json)
        return
    if FLAGS.config is None:
        raise app.UsageError("--config (a train step to plan) or --karlo is required")
    p = plan(FLAGS.config, FLAGS.topology, FLAGS.mfu)
    p.pop("abstract_state"), p.pop("abstract_batch")
    console.report(format_plan(p), p, FLAGS.json)


if __name__ == "__main__":
    from unclip_jax import console
    FLAGS = flags.FLAGS
    console.define_tool_flags(config_required=False)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (default config.aot.topology)")
    flags.DEFINE_float("mfu", 0.4, "MFU assumed for the implied step time")
    flags.DEFINE_string("karlo", None, "Plan Karlo's text -> image sampling instead of a train "
                        "step: 'full' (karlo-v1-alpha's architecture) or a converted workdir")
    flags.DEFINE_integer("batch", None, "--karlo: prompts per call (default 4 per chip)")
    flags.DEFINE_bool("fsdp", False, "--karlo: split the weights over the chips")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "--karlo: weights and "
                      "arithmetic")
    console.run_app(main)
