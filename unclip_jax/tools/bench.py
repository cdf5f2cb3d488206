"""Training throughput of any stage's real sharded train step.

  python -m unclip_jax.tools.bench --config=experiments/<file>.py [--steps=10] [--json=out.json]
                             [--config.mesh.fsdp=2 ...] [--scaling]

Prints compile time, steady-state step time (median over --steps timed steps after --warmup),
examples/s (global and per device), model FLOPs per step (matmuls and convolutions counted from
the program, x3 for forward+backward; XLA's own count beside it), achieved TFLOP/s per device,
MFU against the device's peak (a table for TPUs/GPUs; on CPU a measured matmul peak), and peak
device memory. --scaling repeats the run with the same per-device batch on 1, 2, 4, ... devices.
Batches are synthetic (the stage's example batch, random-filled): input pipelines are not timed.
"""
from __future__ import annotations

import resource
import statistics
import time

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator


import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from unclip_jax import parallel
from unclip_jax.tools import hardware, host_malloc


def cpu_peak_flops(n: int = 1024, reps: int = 8) -> float:
    """Achievable float32 matmul FLOP/s of this host (the CPU 'peak' for MFU), measured."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times)


def device_peak_flops(device) -> tuple[float, str]:
    facts = hardware.chip_of_device_kind(device.device_kind)
    if facts is not None:
        return facts["peak_flops"], f"{device.device_kind} (table)"
    if device.platform == "cpu":
        # One jax CPU device uses all host cores; fake CPU devices share them.
        return cpu_peak_flops() / max(jax.local_device_count(), 1), "cpu (measured matmul)"
    return float("nan"), f"{device.device_kind} (unknown peak)"


def _random_batch(example: dict, global_batch: int, sharding, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in example.items():
        shape = (global_batch,) + v.shape[1:]
        if np.issubdtype(v.dtype, np.floating):
            x = rng.uniform(-1, 1, shape).astype(v.dtype)
        elif v.dtype == np.bool_:
            x = rng.random(shape) < 0.9
        else:
            x = rng.integers(0, 2, shape).astype(v.dtype)  # token ids / labels: small valid ids
        out[k] = jax.device_put(x, sharding)
    return out


def _peak_memory(compiled) -> tuple[int, str]:
    stats = [d.memory_stats() for d in jax.local_devices()]
    if stats and all(s and "peak_bytes_in_use" in s for s in stats):
        return max(int(s["peak_bytes_in_use"]) for s in stats), "device peak_bytes_in_use"
    mem = compiled.memory_analysis()
    if mem is not None:
        est = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)
        return int(est), "compiled memory_analysis (per device)"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host max RSS"


def benchmark(config, *, steps: int = 10, warmup: int = 2) -> dict:
    from unclip_jax.tools.flops import step_model_flops
    from unclip_jax.train.state import count_params
    from unclip_jax.train.trainer import build_step, validate_config

    parallel.split_cpu_devices(config.mesh)
    n_dev = int(config.mesh.num_devices) or jax.device_count()
    validate_config(config, None, n_dev, jax.process_count())
    b = build_step(config)
    gb = int(config.train.batch_size)
    n_dev = b.mesh.devices.size
    batch = _random_batch(b.example, gb, b.batch_sharding)

    t0 = time.perf_counter()
    with jax.set_mesh(b.mesh):
        compiled = b.step.lower(b.abstract_state, b.abstract_batch(gb)).compile()
    compile_s = time.perf_counter() - t0
    state = b.init()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with jax.set_mesh(b.mesh):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_time = statistics.median(times)

    model_flops = step_model_flops(b, config)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    xla_flops = float(cost.get("flops", 0.0)) * n_dev if cost else float("nan")
    peak, peak_src = device_peak_flops(b.mesh.devices.flat[0])
    tflops_dev = model_flops / step_time / n_dev / 1e12
    mem, mem_src = _peak_memory(compiled)
    return {
        "stage": config.stage,
        "device": b.mesh.devices.flat[0].device_kind,
        "devices": int(n_dev),
        "mesh": {k: int(v) for k, v in b.mesh.shape.items()},
        "params": count_params(b.abstract_state.params),
        "global_batch": gb,
        "compile_s": compile_s,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "examples_per_s": gb / step_time,
        "examples_per_s_per_device": gb / step_time / n_dev,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "tflops_per_device": tflops_dev,
        "peak_flops_per_device": peak,
        "peak_flops_source": peak_src,
        "mfu": tflops_dev * 1e12 / peak,
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_src,
        "loss": float(metrics["loss"]),
        # XLA:CPU's step time depends on the host allocator (unclip_jax.tools.host_malloc).
        "host_allocator": host_malloc.allocator(),
    }


def scaling(config, *, steps: int, warmup: int) -> list[dict]:
    """Same per-device batch on 1, 2, 4, ... devices; efficiency = throughput / (n x 1-device)."""
    parallel.split_cpu_devices(config.mesh)
    per_dev = int(config.train.batch_size) // (int(config.mesh.num_devices)
                                               or jax.device_count())
    per_dev = max(per_dev, 1)
    rows, n = [], 1
    while n <= jax.device_count():
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.mesh.update(num_devices=n, data=-1, fsdp=1, tensor=1)
            c.train.batch_size = per_dev * n
        r = benchmark(c, steps=steps, warmup=warmup)
        r["scaling_efficiency"] = r["examples_per_s"] / (n * rows[0]["examples_per_s"]) if rows else 1.0
        rows.append(r)
        n *= 2
    return rows


def format_result(r: dict) -> str:
    rows = [
        ("stage / device", f"{r['stage']} on {r['devices']} x {r['device']} mesh {r['mesh']}"),
        ("params", f"{r['params']:,}"), ("global batch", r["global_batch"]),
        ("compile", f"{r['compile_s']:.2f} s"),
        ("step time (median)", f"{r['step_time_s']:.4f} s (min {r['step_time_min_s']:.4f})"),
        ("examples/s", f"{r['examples_per_s']:.1f} ({r['examples_per_s_per_device']:.1f}/device)"),
        ("model FLOPs/step", f"{r['model_flops_per_step']:.3e} (XLA counts {r['xla_flops_per_step']:.3e})"),
        ("TFLOP/s per device", f"{r['tflops_per_device']:.3f}"),
        ("MFU", f"{r['mfu']:.1%} of {r['peak_flops_per_device'] / 1e12:.2f} TFLOP/s ({r['peak_flops_source']})"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['peak_memory_source']})"),
        ("host allocator", r.get("host_allocator", "?")),
    ]
    if "scaling_efficiency" in r:
        rows.append(("scaling efficiency", f"{r['scaling_efficiency']:.2f}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv):
    del argv
    from unclip_jax import console
    console.quiet_terminal()  # library INFO logging (compiles, Orbax) is not for the terminal
    if FLAGS.scaling:
        result = scaling(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup)
        console.report("\n\n".join(format_result(r) for r in result), result, FLAGS.json)
    else:
        result = benchmark(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup)
        console.report(format_result(result), result, FLAGS.json)


if __name__ == "__main__":
    from unclip_jax import console
    FLAGS = flags.FLAGS
    console.define_tool_flags()
    flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_bool("scaling", False, "Run on 1, 2, 4, ... devices with the same per-device batch.")
    console.run_app(main)
