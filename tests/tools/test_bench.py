"""The throughput benchmark's figures are consistent with each other and with the program."""
import pytest

from unclip_jax.tools import bench

from helpers.trainer import toy_config

KEYS = ("params", "compile_s", "step_time_s", "examples_per_s", "examples_per_s_per_device",
        "model_flops_per_step", "tflops_per_device", "mfu", "peak_memory_bytes")


def test_benchmark_figures_are_consistent():
    cfg = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    r = bench.benchmark(cfg, steps=3, warmup=1)
    assert all(k in r for k in KEYS)
    assert r["devices"] == 8 and r["params"] == 2 * (16 * 32 + 32 + 32 * 16 + 16)
    assert r["examples_per_s"] == pytest.approx(16 / r["step_time_s"])
    assert r["examples_per_s_per_device"] == pytest.approx(r["examples_per_s"] / 8)
    # 2 layers x (16x32 + 32x16) MACs x 2 FLOPs x 16 examples x 3 (fwd + bwd).
    assert r["model_flops_per_step"] == 3 * 2 * 16 * 2 * (16 * 32 + 32 * 16)
    assert r["tflops_per_device"] == pytest.approx(
        r["model_flops_per_step"] / r["step_time_s"] / 8 / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / r["peak_flops_per_device"])
    assert r["peak_memory_bytes"] > 0


def test_scaling_keeps_per_device_batch():
    cfg = toy_config(**{"train.batch_size": 8})
    rows = bench.scaling(cfg, steps=2, warmup=1)
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    assert [r["global_batch"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["scaling_efficiency"] == 1.0
