"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets no environment variable and starts no process. The CPU host setup
(JAX pinned to the CPU on a host without accelerators, an XLA:CPU flag and the allocator:
`unclip_jax.tools.host_malloc.prepare_cpu_host`) is done by the command-line entry points alone,
before they import JAX.
"""
__version__ = "0.1.0"
