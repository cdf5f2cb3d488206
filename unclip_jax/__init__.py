"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets one XLA CPU flag before JAX starts its backend: by default XLA's CPU
backend fuses convolutions into a slow path; turning that fusion off for individual convolutions
made our U-Nets ~2x faster on CPU (see shared jax-notes). The flag only touches the CPU backend and
is left alone when the user has set it.

A command started as `python -m unclip_jax.<tool>` on a CPU-only Linux host re-executes itself
once, before JAX is imported, with glibc's transparent-huge-page tunable: XLA:CPU's per-call temp
buffer is then faulted in 2 MiB pages, not 4 KiB ones (`unclip_jax.host_malloc`; 14-33% faster
CPU train steps, measured; UNCLIP_JAX_HUGEPAGES=0 turns it off).
"""
import os

from unclip_jax import host_malloc

_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_CONV_FLAG).strip()

host_malloc.reexec_with_huge_pages()

__version__ = "0.1.0"
