"""Accelerator facts used by benchmarks and ahead-of-time plans (vendor-published peaks).

As a command, this host's memory settings for JAX on the CPU, as one JSON line:

  python -m unclip_jax.tools.hardware [--probe]

allocator (what this process runs with, after the entry point's re-execution), would_reexecute and
why (`host_malloc.choose` for a `python -m unclip_jax.<tool>` command), the kernel's transparent
huge page mode and the tcmalloc found; --probe adds the page faults per call of a jitted program.
"""
from __future__ import annotations

if __name__ == "__main__":
    from unclip_jax.tools import host_malloc

    host_malloc.prepare_cpu_host()  # before JAX is imported: the allocator this command reports

# Dense bf16 peak FLOP/s per *chip* and HBM bytes per chip.
TPU = {
    "v4": dict(peak_flops=275e12, hbm=32 * 2**30),
    "v5e": dict(peak_flops=197e12, hbm=16 * 2**30),
    "v5p": dict(peak_flops=459e12, hbm=95 * 2**30),
    "v6e": dict(peak_flops=918e12, hbm=32 * 2**30),
}
GPU = {
    "A100": dict(peak_flops=312e12, hbm=80 * 2**30),
    "H100": dict(peak_flops=989e12, hbm=80 * 2**30),
    "H200": dict(peak_flops=989e12, hbm=141 * 2**30),
}
# jax device_kind strings -> table keys.
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
          "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def tpu_generation(topology: str) -> str:
    gen = topology.split(":")[0].lower()
    if gen not in TPU:
        raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(TPU)}")
    return gen


def chip_of_device_kind(kind: str) -> dict | None:
    """Table entry for a jax device_kind (None for CPUs and unknown devices)."""
    if kind in _KINDS:
        return TPU[_KINDS[kind]]
    for name, facts in GPU.items():
        if name in kind:
            return facts
    return None


def temp_buffer_page_faults(calls: int = 8) -> dict:
    """Page faults per call of a jitted program with a 128 MiB temp buffer, after warm-up (median
    over `calls`, as tcmalloc returns memory to the kernel on the odd call): about one per 4 KiB
    page of it when XLA:CPU's temp block is mapped afresh in small pages, ~1/512 of that with
    transparent huge pages, ~0 when the allocator reuses it (tcmalloc); see
    `unclip_jax.tools.host_malloc`."""
    import resource
    import statistics

    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda a, b, c: jnp.tanh(a @ b) @ c)
    a, b, c = jnp.ones((4096, 64)) / 64, jnp.ones((64, 8192)), jnp.ones((8192, 4))
    temp = f.lower(a, b, c).compile().memory_analysis().temp_size_in_bytes
    for _ in range(3):
        f(a, b, c).block_until_ready()
    faults = []
    for _ in range(calls):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(a, b, c).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    return dict(temp_pages=temp / 4096, faults_per_call=statistics.median(faults))


def report(probe: bool = False) -> dict:
    """What `python -m unclip_jax.tools.hardware` prints (see the module docstring)."""
    import os

    from unclip_jax.tools import host_malloc
    remedy, why = host_malloc.choose(argv=["python", "-m", "unclip_jax.tools.hardware"])
    out = dict(allocator=host_malloc.allocator(), reexecuted=bool(os.environ.get(host_malloc.MARK)),
               would_reexecute=remedy, why=why, thp_mode=host_malloc.thp_mode(),
               tcmalloc=host_malloc.find_tcmalloc())
    if probe:
        out.update(temp_buffer_page_faults())
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import json
    print(json.dumps(report(FLAGS.probe)))


if __name__ == "__main__":
    from absl import app, flags

    FLAGS = flags.FLAGS
    flags.DEFINE_bool("probe", False, "Also measure the page faults per call of a jitted program "
                      "with a 128 MiB temp buffer (imports JAX; a few seconds).")
    from unclip_jax import console
    console.run_app(main)
