"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU host."""
import numpy as np
import pytest

from unclip_jax.tools import aot

from helpers.trainer import load_config, toy_config


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


def _tile_padded_bytes(shape, itemsize):
    # Upper bound of a TPU buffer: the minor two dims padded to (8, 128) tiles, vectors to 1024.
    if len(shape) == 0:
        return 4 * 1024
    if len(shape) == 1:
        return -(-shape[0] // 1024) * 1024 * itemsize
    *major, r, c = shape
    return int(np.prod(major, dtype=np.int64)) * (-(-r // 8) * 8) * (-(-c // 128) * 128) * itemsize


def test_decoder_plan_memory_is_consistent_with_sharded_state():
    # A real stage (the smoke decoder cut to one 16x16 level without the caption encoder: the
    # TPU compile of the two-level 32x32 one takes 3x longer and proves nothing more) on 4 v5p
    # chips, all fsdp: what the compiled step says it holds per chip must be the sharded state.
    cfg = load_config("decoder_shapes.py", "smoke")
    cfg.model.update(text_depth=0, image_size=16, channel_mult=(1,))
    cfg.train.batch_size = 8
    cfg.mesh.update(data=1, fsdp=4, tensor=1)
    p = aot.plan(cfg, "v5p:2x2x1")
    assert p["chips"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p["per_chip_batch"] == 2
    n = p["params"]
    args = p["memory_breakdown_per_device"]["arguments"]
    # params + EMA + Adam mu + nu, float32; fsdp splits them at most 4 ways per chip.
    assert args >= 4 * 4 * n / 4

    # Exactly: the per-chip shards of every state leaf, plus this chip's 2 examples.
    import jax
    leaves = jax.tree.leaves(p["abstract_state"])
    assert sum(x.size for x in jax.tree.leaves(p["abstract_state"].params)) == n
    shards = [leaf.sharding.shard_shape(leaf.shape) for leaf in leaves]
    raw = sum(int(np.prod(s, dtype=np.int64)) * leaf.dtype.itemsize
              for s, leaf in zip(shards, leaves))
    padded = sum(_tile_padded_bytes(s, leaf.dtype.itemsize) for s, leaf in zip(shards, leaves))
    batch = {k: (v.sharding.shard_shape(v.shape), v.dtype)
             for k, v in p["abstract_batch"].items()}
    assert {s[0] for s, _ in batch.values()} == {2}
    batch_raw = sum(int(np.prod(s)) * d.itemsize for s, d in batch.values())
    batch_padded = sum(2 * _tile_padded_bytes(s[1:], max(d.itemsize, 4))
                       for s, d in batch.values())
    assert raw > 4 * 4 * n / 4          # small vectors are replicated, not split
    assert raw + batch_raw <= args <= padded + batch_padded
    # The step donates the state: its outputs alias the state arguments (counted once).
    assert 0.95 * raw <= p["memory_breakdown_per_device"]["aliased"] <= args
    assert p["fits"] and p["model_flops_per_step"] > 0


def _minimal_karlo(w: int = 8):
    """Karlo's layout (every block type its sampler runs) at the smallest widths (`w` wide):
    one level per U-Net, one transformer layer; the TPU compile of the sampler costs ~1 s per
    level."""
    from unclip_jax.models import karlo_import as ki
    arch = ki.karlo_v1_alpha()
    c = arch["configs"]
    unet = dict(layers_per_block=1, block_out_channels=[w], norm_num_groups=4,
                attention_head_dim=8)
    c["decoder"].update(unet, sample_size=8, cross_attention_dim=w,
                        down_block_types=["SimpleCrossAttnDownBlock2D"],
                        up_block_types=["SimpleCrossAttnUpBlock2D"])
    c["text_proj"].update(clip_extra_context_tokens=2, clip_embeddings_dim=w,
                          time_embed_dim=4 * w, cross_attention_dim=w)
    for k in ("super_res_first", "super_res_last"):
        c[k].update(unet, sample_size=16, down_block_types=["ResnetDownsampleBlock2D"],
                    up_block_types=["ResnetUpsampleBlock2D"])
    c["prior"].update(num_attention_heads=1, attention_head_dim=w, num_layers=1,
                      embedding_dim=w, num_embeddings=4)
    c["text_encoder"].update(vocab_size=64, hidden_size=w, intermediate_size=2 * w,
                             num_hidden_layers=1, num_attention_heads=1,
                             max_position_embeddings=4, projection_dim=w, bos_token_id=62,
                             eos_token_id=63, pad_token_id=0)
    return arch


@pytest.fixture(scope="module")
def karlo_fsdp_plan():
    """Karlo's layout 256 wide (TPU tile padding small beside the weights) planned on 4 v5p
    chips, batch 8 over them, float32, the weights split (--fsdp): the one TPU compile (most of
    this module's time) that both Karlo tests read."""
    return aot.karlo_plan(_minimal_karlo(256), "v5p:2x2x1", batch=8, fsdp=True, dtype="float32")


def test_karlo_sampling_plan_memory_is_the_sharded_weights_and_batch(karlo_fsdp_plan):
    # Karlo's text -> image program on 4 v5p chips, batch over the chips, weights fsdp-split.
    import jax
    p = karlo_fsdp_plan
    assert p["chips"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert p["per_chip_batch"] == 2 and p["image_size"] == 16
    leaves = jax.tree.leaves(p["abstract_params"])
    assert p["params"] == sum(int(np.prod(x.shape)) for x in leaves)
    shards = [x.sharding.shard_shape(x.shape) for x in leaves]
    split = [s != x.shape for s, x in zip(shards, leaves)]
    assert any(split) and not all(split)
    raw = sum(int(np.prod(s)) * 4 for s in shards)
    padded = sum(_tile_padded_bytes(s, 4) for s in shards)
    # This chip's 2 rows of the tokens, masks and their "" twins (int32 / bool) and the key.
    batch_raw = 2 * (2 * 4 * 4 + 2 * 4 * 1)
    batch_padded = 4 * _tile_padded_bytes((2, 4), 4) + _tile_padded_bytes((2,), 4)
    args = p["memory_breakdown_per_device"]["arguments"]
    assert raw + batch_raw <= args <= padded + batch_padded
    assert raw < p["params"] * 4                   # less than the whole (replicated) model
    assert p["memory_per_chip_bytes"] >= args and p["fits"]
    # The implied rate is the traced model FLOPs at the assumed MFU of the 4 chips' peak.
    from unclip_jax.tools import hardware
    rate = 8 * hardware.TPU["v5p"]["peak_flops"] * 4 * 0.4 / p["model_flops_per_call"]
    assert p["images_per_s_at_mfu"] == pytest.approx(rate)


def test_karlo_fsdp_plan_holds_about_a_quarter_of_the_replicated_weights_per_chip(
        karlo_fsdp_plan):
    # With --fsdp (the real threshold) the per-chip arguments (weights + 2 prompts' tokens) are
    # about a quarter of what the replicated plan holds per chip (every weight whole; counted
    # from the same shapes, not compiled a second time); the rest is the norms and biases, whole
    # on every chip.
    import jax

    from unclip_jax import karlo, parallel
    split = karlo_fsdp_plan
    leaves = jax.tree.leaves(split["abstract_params"])
    # The replicated plan's mesh and layout: 4 data-parallel chips, each with every weight.
    mesh = parallel.make_mesh({"data": -1}, devices=aot.topology_devices("v5p:2x2x1"))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
    rep = jax.tree.leaves(karlo.param_shardings(split["abstract_params"], mesh, False))
    assert all(s.shard_shape(x.shape) == x.shape for x, s in zip(leaves, rep))
    large = [np.prod(x.shape) >= karlo.FSDP_MIN_SIZE for x in leaves]
    # Every large weight is split 4 ways (each has a dimension that 4 divides).
    assert all(x.sharding.shard_shape(x.shape) != x.shape
               for x, g in zip(leaves, large) if g)
    big = sum(int(np.prod(x.shape)) * 4 for x, g in zip(leaves, large) if g)
    small = sum(int(np.prod(x.shape)) * 4 for x, g in zip(leaves, large) if not g)
    assert big > 0.9 * (big + small)          # the layout's weights are mostly matrices
    a_rep = big + small                        # the replicated plan's weights per chip
    a_split = split["memory_breakdown_per_device"]["arguments"]
    slack = 64 * 1024                          # this chip's token rows, tile padding
    assert big / 4 + small <= a_split <= 1.05 * (big / 4 + small) + slack
    assert 0.25 <= a_split / a_rep < 0.3
