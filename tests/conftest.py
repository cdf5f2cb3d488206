"""Every test sees 8 fake CPU devices, so mesh code is exercised without accelerators."""
import unclip_jax  # noqa: F401  (sets XLA CPU flags before the backend starts)

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
