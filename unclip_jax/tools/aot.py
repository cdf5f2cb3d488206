"""Ahead-of-time plan of a sharded train step for a TPU topology, compiled on a CPU host.

  python -m unclip_jax.tools.aot --config=experiments/paper/decoder_64.py [--topology=v5p:4x4x4]
                           [--json=plan.json] [--mfu=0.4]

Compiles the real train step (same code as training: unclip_jax.train.trainer.build_step) for the
topology through libtpu (`pip install 'jax[tpu]'` or the test extra; no TPU needed) with abstract
inputs, and reports per-chip memory against HBM, FLOPs per step and the step time implied at a
given MFU. The topology defaults to the config's `aot.topology`, so each paper config names one.
"""
from __future__ import annotations

import os
import time

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import jax
from absl import flags

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


def plan(config, topology: str | None = None, mfu: float = 0.4) -> dict:
    """Compile `config`'s train step for `topology` and return the plan's figures."""
    from unclip_jax.tools.flops import step_model_flops
    from unclip_jax.train.state import count_params
    from unclip_jax.train.trainer import build_step, validate_config

    topology = topology or config.aot.topology
    if not topology:
        raise ValueError("no topology: pass --topology or set config.aot.topology")
    gen = hardware.tpu_generation(topology)
    devices = topology_devices(topology)
    chips = len({tuple(d.coords) for d in devices})
    devices_per_chip = len(devices) // chips
    validate_config(config, None, len(devices), 1)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    t0 = time.perf_counter()
    b = build_step(config, mesh)
    global_batch = int(config.train.batch_size)
    with jax.set_mesh(mesh):
        lowered = b.step.lower(b.abstract_state, b.abstract_batch(global_batch))
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    per_chip = per_device * devices_per_chip
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
        "config_stage": config.stage,
        "params": n_params,
        "topology": topology,
        "chips": chips,
        "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": global_batch,
        "per_chip_batch": global_batch / chips,
        "memory_per_chip_bytes": int(per_chip),
        "memory_breakdown_per_device": {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
            "code": int(mem.generated_code_size_in_bytes)},
        "hbm_per_chip_bytes": int(hbm),
        "fits": bool(per_chip <= hbm),
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "mfu_assumed": mfu,
        "step_time_at_mfu_s": model_flops / (peak * mfu) if peak else None,
        "compile_s": compile_s,
    }


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
    p = plan(FLAGS.config, FLAGS.topology, FLAGS.mfu)
    console.report(format_plan(p), p, FLAGS.json)


if __name__ == "__main__":
    from unclip_jax import console
    FLAGS = flags.FLAGS
    console.define_tool_flags()
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (default config.aot.topology)")
    flags.DEFINE_float("mfu", 0.4, "MFU assumed for the implied step time")
    console.run_app(main)
