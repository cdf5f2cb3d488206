"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package sets no environment variable and starts no process. The CPU host setup
(the allocator and an XLA:CPU flag, `unclip_jax.tools.host_malloc.prepare_cpu_host`) is done by
the command-line entry points alone.
"""
__version__ = "0.1.0"
