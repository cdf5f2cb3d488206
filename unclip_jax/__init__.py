"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets one XLA CPU flag before JAX starts its backend: by default XLA's CPU
backend fuses convolutions into a slow path; turning that fusion off for individual convolutions
made our U-Nets ~2x faster on CPU (see shared jax-notes). The flag only touches the CPU backend and
is left alone when the user has set it.
"""
import os

_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_CONV_FLAG).strip()

__version__ = "0.1.0"
