"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets one XLA CPU flag before JAX starts its backend: by default XLA's CPU
backend fuses convolutions into a slow path; turning that fusion off for individual convolutions
made our U-Nets ~2x faster on CPU (see shared jax-notes). The flag only touches the CPU backend and
is left alone when the user has set it.

A command started as `python -m unclip_jax.<tool>` on a CPU-only Linux host re-executes itself
once, before JAX is imported, with an allocator that does not map XLA:CPU's large per-step blocks
afresh on every step: tcmalloc when installed, else glibc with transparent huge pages
(`unclip_jax.host_malloc`; UNCLIP_JAX_MALLOC=off turns it off).
"""
import os

from unclip_jax import host_malloc

_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_CONV_FLAG).strip()

host_malloc.reexec()

__version__ = "0.1.0"
