"""The generic sharded trainer: one loop for every stage (see unclip_jax.stages)."""
