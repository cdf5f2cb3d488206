"""Benchmark configs (python -m unclip_jax.bench --config=experiments/bench/<file>.py)."""
