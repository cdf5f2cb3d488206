"""PCA (streaming, low-rank recovery, save/load) and per-dimension quantisation."""
import numpy as np
import pytest

from unclip_jax.models import pca as pca_lib


def _low_rank(n=4000, d=24, r=3, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, r)))
    scales = np.array([5.0, 2.0, 1.0])[:r]
    x = (rng.normal(size=(n, r)) * scales) @ basis.T + rng.normal(size=d) * 3
    return x + noise * rng.normal(size=(n, d)), basis, scales


def test_recovers_low_rank_subspace_and_variance():
    x, basis, scales = _low_rank()
    p = pca_lib.fit_pca(x[i:i + 500] for i in range(0, len(x), 500))  # streamed in batches
    assert p.count == len(x)
    assert np.all(np.diff(p.eigenvalues) <= 0)
    # The top-3 subspace equals the true one: projecting the basis onto it loses nothing.
    top = p.components[:3]
    np.testing.assert_allclose(np.linalg.norm(top @ basis, axis=0), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(p.eigenvalues[:3]), scales, rtol=0.06)
    assert p.explained_variance_ratio[:3].sum() > 0.9999
    report = pca_lib.relative_mse(p, ks=[1, 2, 3, 24])
    assert report[1] > 0.1 and report[3] < 1e-6 and report[24] < 1e-12
    measured = pca_lib.relative_mse(p, x, ks=[1, 2, 3])
    for k in (1, 2, 3):
        assert measured[k] == pytest.approx(report[k], rel=1e-3, abs=1e-9)


def test_transform_inverse_and_save_load(tmp_path):
    x, _, _ = _low_rank(noise=0.0)
    p = pca_lib.fit_pca(x)
    z = p.transform(x[:10], 3)
    assert z.shape == (10, 3)
    np.testing.assert_allclose(p.inverse_transform(z), x[:10], atol=1e-4)
    path = str(tmp_path / "pca.npz")
    p.save(path)
    q = pca_lib.PCA.load(path)
    np.testing.assert_array_equal(q.components, p.components)
    np.testing.assert_array_equal(q.transform(x[:5], 2), p.transform(x[:5], 2))


def test_stats_merge_equals_single_fit():
    x, _, _ = _low_rank()
    a = pca_lib.PCAStats(24).update(x[:1500])
    b = pca_lib.PCAStats(24).update(x[1500:])
    merged, single = a.merge(b).finalize(), pca_lib.fit_pca(x)
    # Sums in another order: the noise-floor eigenvalues (~1e-6) may differ in the last bits
    # (2e-15 measured on an AMD EPYC host), so the absolute slack is 1e-12 of the top one.
    np.testing.assert_allclose(merged.eigenvalues, single.eigenvalues, rtol=1e-9,
                               atol=1e-12 * float(single.eigenvalues[0]))
    np.testing.assert_allclose(merged.components[:3], single.components[:3], atol=1e-8)


def test_quantize_error_bounded_by_bucket_width(tmp_path):
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(size=20000), rng.exponential(size=20000),
                  rng.uniform(-3, 3, size=20000)], 1)
    qz = pca_lib.fit_quantizer(x, num_buckets=256)
    q = qz.quantize(x)
    assert q.dtype == np.int32 and q.min() == 0 and q.max() == 255
    # Equal mass: each bucket holds about 1/256 of the training values.
    counts = np.stack([np.bincount(q[:, d], minlength=256) for d in range(3)])
    assert counts.min() >= 20000 / 256 - 2 and counts.max() <= 20000 / 256 + 2
    width = np.take_along_axis(np.diff(qz.edges, axis=1), q.T, 1).T
    err = np.abs(qz.dequantize(q) - x)
    assert np.all(err <= width + 1e-6)
    # New values inside the fitted range obey the same bound.
    y = rng.normal(size=(500, 3)) * 0.5 + 0.5
    y = np.clip(y, qz.edges[:, 0], qz.edges[:, -1])
    qy = qz.quantize(y)
    wy = np.take_along_axis(np.diff(qz.edges, axis=1), qy.T, 1).T
    assert np.all(np.abs(qz.dequantize(qy) - y) <= wy + 1e-6)
    # Bucket centres are the mean of the training values in each bucket.
    d0 = x[:, 0][q[:, 0] == 100]
    assert qz.centres[0, 100] == pytest.approx(d0.mean())
    path = str(tmp_path / "q.npz")
    qz.save(path)
    np.testing.assert_array_equal(pca_lib.Quantizer.load(path).quantize(y), qy)


def test_quantizer_needs_enough_samples():
    with pytest.raises(ValueError, match="num_buckets"):
        pca_lib.fit_quantizer(np.zeros((10, 2)), num_buckets=1024)


def test_fit_cache_writes_pca_and_quantizer_beside_the_cache(tmp_path, monkeypatch):
    """What `python -m unclip_jax.models.pca --cache=DIR` does, on a stand-in cache field."""
    from unclip_jax.data import cache
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    monkeypatch.setattr(cache, "load_field",
                        lambda d, split, field: x if (d, split, field) == (
                            str(tmp_path), "train", "image_embedding") else None)
    lines = []
    pca = pca_lib.fit_cache(str(tmp_path), buckets=16, batch=128, log=lines.append)
    assert pca.count == 300 and any(line.startswith("k=    6") for line in lines)
    loaded = pca_lib.PCA.load(str(tmp_path / "pca_image_embedding.npz"))
    np.testing.assert_allclose(loaded.mean, pca.mean)
    q = pca_lib.Quantizer.load(str(tmp_path / "quantizer_image_embedding.npz"))
    assert q.num_buckets == 16 and q.edges.shape == (6, 17)


# ------------------------------------------------- the AR prior's codec, streamed over processes
DIM, K, BUCKETS = 12, 5, 16


def _write_cache(root, shards_per_process, seed=0):
    """An embedding cache (unclip_jax.data.cache layout) of correlated z_i / z_t, written by
    len(shards_per_process) processes with the given shard sizes; returns (z_i, z_t) in row
    order."""
    import json
    import os
    rng = np.random.default_rng(seed)
    split = root / "train"
    split.mkdir(parents=True)
    rows, out = 0, ([], [])
    mix = rng.normal(size=(DIM, DIM)) * np.linspace(3, 0.2, DIM)[:, None]
    for p, sizes in enumerate(shards_per_process):
        shards = []
        for s, n in enumerate(sizes):
            name = f"p{p:04d}.s{s:05d}"
            z_i = (rng.normal(size=(n, DIM)) @ mix + 1.5).astype(np.float32)
            z_t = (z_i + rng.normal(size=(n, DIM))).astype(np.float32)
            for field, arr in (("image_embedding", z_i), ("text_embedding", z_t),
                               ("index", np.arange(rows, rows + n, dtype=np.int64))):
                np.save(split / f"{field}.{name}.npy", arr)
            (split / f"caption.{name}.json").write_text(json.dumps(["c"] * n))
            out[0].append(z_i)
            out[1].append(z_t)
            shards.append({"name": name, "count": n})
            rows += n
        fields = {f: {"shape": [DIM], "dtype": "float32"}
                  for f in ("image_embedding", "text_embedding")}
        fields["index"] = {"shape": [], "dtype": "int64"}
        (split / f"manifest.p{p:04d}.json").write_text(json.dumps(
            {"split": "train", "process_index": p, "process_count": len(shards_per_process),
             "num_examples": sum(sizes), "shards": shards, "fields": fields, "source": {}}))
        assert os.path.exists(split / f"manifest.p{p:04d}.json")
    return np.concatenate(out[0]), np.concatenate(out[1])


def _assert_codecs_equal(got, want, z_i, z_t):
    np.testing.assert_allclose(got.pca.eigenvalues, want.pca.eigenvalues, rtol=1e-9,
                               atol=1e-12 * float(want.pca.eigenvalues[0]))
    np.testing.assert_allclose(got.quantizer.edges, want.quantizer.edges, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.dot_quantizer.edges, want.dot_quantizer.edges, rtol=1e-9)
    np.testing.assert_array_equal(got.encode(z_i, z_t), want.encode(z_i, z_t))


def test_streamed_codec_equals_one_shot_fit(tmp_path):
    """One process streaming the cache in chunks: the codec equals fit_codec of all the rows;
    with max_rows below the row count the buckets come from every stride-th row."""
    from unclip_jax.data import cache
    from unclip_jax.models.ar_prior import fit_codec, fit_codec_streaming
    z_i, z_t = _write_cache(tmp_path, [[70, 50], [90]])

    def batches():
        for start, f in cache.iter_rows(str(tmp_path), "train",
                                        ("image_embedding", "text_embedding"), batch=32):
            yield start, f["image_embedding"], f["text_embedding"]
    streamed = fit_codec_streaming(batches, DIM, K, BUCKETS)
    _assert_codecs_equal(streamed, fit_codec(z_i, z_t, K, BUCKETS), z_i, z_t)
    sub = fit_codec_streaming(batches, DIM, K, BUCKETS, max_rows=100)   # stride 3
    want = fit_codec(z_i, z_t, K, BUCKETS)
    assert sub.pca.count == len(z_i)
    np.testing.assert_allclose(sub.quantizer.edges, pca_lib.fit_quantizer(
        want.pca.transform(z_i[::3], K), BUCKETS).edges, rtol=1e-6, atol=1e-6)


def test_codec_fitted_by_two_processes_equals_one_shot_fit(tmp_path):
    """Two local processes fit the AR prior's codec through the stage (ar_prior.get_codec), each
    streaming its own shards: both get the codec of a one-shot fit of the whole split."""
    from helpers.processes import run_workers
    from unclip_jax.models.ar_prior import ARCodec, fit_codec
    # Three shards: process 0 of the fit reads shards 0 and 2, process 1 shard 1.
    z_i, z_t = _write_cache(tmp_path, [[70, 50], [90]])
    results = run_workers(2, 1, str(tmp_path), MP_TASK="ar_codec", MP_DIM=str(DIM),
                          MP_K=str(K), MP_BUCKETS=str(BUCKETS))
    want = fit_codec(z_i, z_t, K, BUCKETS)
    assert results[0] == {**results[1], "process": 0}     # both processes hold the same codec
    np.testing.assert_allclose(results[0]["eigenvalues"], want.pca.eigenvalues, rtol=1e-9,
                               atol=1e-12 * float(want.pca.eigenvalues[0]))
    np.testing.assert_allclose(results[0]["edges"], want.quantizer.edges, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[0]["dot_edges"], want.dot_quantizer.edges, rtol=1e-9)
    np.testing.assert_array_equal(results[0]["tokens"], want.encode(z_i, z_t))
    _assert_codecs_equal(ARCodec.load(str(tmp_path / "codec.npz")), want, z_i, z_t)
