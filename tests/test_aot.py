"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU host."""
import numpy as np

from unclip_jax import aot

from trainer_util import toy_config


def test_toy_plan_for_v5p_memory_matches_state_bytes():
    cfg = toy_config(**{"model.width": 64, "data.dim": 64, "model.hidden": 256,
                        "train.batch_size": 64, "mesh.data": 2, "mesh.fsdp": 2})
    p = aot.plan(cfg, "v5p:2x2x1")
    assert p["chips"] == 4 and p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    n = p["params"]
    assert n == 2 * (64 * 256 + 256 + 256 * 64 + 64)
    # State = params + EMA + Adam mu + nu (float32); fsdp=2 halves the matrices on each chip.
    matrices = 2 * (64 * 256 * 2)
    vectors = n - matrices
    expected_state = 4 * 4 * (matrices / 2 + vectors)
    args = p["memory_breakdown_per_device"]["arguments"]
    batch_bytes = 2 * (64 // 4) * 64 * 4  # x and y, 16 examples per chip
    # TPU layouts pad small vectors to (8, 128) tiles: allow a few percent above the raw bytes.
    assert expected_state + batch_bytes <= args <= 1.05 * (expected_state + batch_bytes)
    assert p["fits"] and p["memory_per_chip_bytes"] < p["hbm_per_chip_bytes"]
    # Forward+backward matmul FLOPs (6 per MAC-example) are most of what XLA counts.
    assert p["model_flops_per_step"] == 6.0 * 2 * 2 * 64 * 256 * 64
    # XLA also counts the elementwise work (GELU, AdamW, EMA): more, but the same order.
    assert 1.0 <= p["xla_flops_per_step"] / p["model_flops_per_step"] < 2.0
    assert np.isfinite(p["step_time_at_mfu_s"]) and p["compile_s"] > 0
