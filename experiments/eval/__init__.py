"""Evaluation configs (python -m unclip_jax.evaluate --config=experiments/eval/<file>.py)."""
