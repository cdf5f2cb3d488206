"""FID / KID / precision-recall / streaming statistics against independent computations."""
import numpy as np
import pytest
from scipy import linalg

from unclip_jax.eval import metrics as M


def _features(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix) * scale + shift


def _fd_reference(x, y):
    """Frechet distance via the symmetric form tr((S1^1/2 S2 S1^1/2)^1/2) with eigh: a different
    route from the sqrtm(S1 S2) of the implementation."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))


def _fd_sqrtm(x, y, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance: sqrtm(S1 S2), retried with eps*I when singular."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    return np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    x = _features(rng, 400, 16)
    y = _features(rng, 300, 16, shift=0.3, scale=1.5)
    got = M.fid_from_features(x, y)
    ref = _fd_reference(x, y)
    assert ref > 1.0
    np.testing.assert_allclose(got, ref, rtol=1e-8)
    np.testing.assert_allclose(got, _fd_sqrtm(x, y), rtol=1e-8)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    x = _features(rng, 500, 8)
    mu, sigma = M.feature_statistics(x)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert abs(M.fid_from_features(x, x)) < 1e-8
    # equal covariances: FD = ||mu1 - mu2||^2 exactly
    for c in (0.1, 1.0, 3.0):
        shift = c * rng.standard_normal(8)
        np.testing.assert_allclose(M.fid_from_features(x, x + shift), shift @ shift, rtol=1e-7)


def test_frechet_distance_survives_singular_covariances():
    """Fewer samples than dimensions (ranks 9 and 11 of 32, as the 2048-d Inception statistics
    of a small evaluation): finite, real, equal to both references (sqrtm is the less accurate
    one on a singular product), and symmetric in its arguments."""
    rng = np.random.default_rng(2)
    for x, y in ((rng.standard_normal((10, 32)), rng.standard_normal((12, 32)) + 0.5),
                 (_features(rng, 6, 24), _features(rng, 40, 24, shift=0.2))):  # one full rank
        got = M.fid_from_features(x, y)
        assert np.isfinite(got) and got > 1.0
        np.testing.assert_allclose(got, _fd_reference(x, y), rtol=1e-7)
        np.testing.assert_allclose(got, _fd_sqrtm(x, y), rtol=1e-5)
        np.testing.assert_allclose(M.fid_from_features(y, x), got, rtol=1e-8)


def test_frechet_distance_names_bad_covariances():
    mu, eye = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="sigma1 has an eigenvalue of -1 .*not PSD"):
        M.frechet_distance(mu, np.diag([1.0, 1.0, 1.0, -1.0]), mu, eye)
    with pytest.raises(ValueError, match="not PSD"):
        M.frechet_distance(mu, eye, mu, np.diag([1.0, 1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="sigma2 has non-finite values"):
        M.frechet_distance(mu, eye, mu, np.full((4, 4), np.nan))


def test_streaming_statistics_equal_batch_ones_and_merge():
    rng = np.random.default_rng(3)
    x = _features(rng, 1000, 12, shift=50.0)  # a large mean: the naive sum of outer products
    mu, sigma = M.feature_statistics(x)       # would lose digits
    st = M.FeatureStats(12, keep_features=True)
    for s in range(0, 1000, 137):
        st.update(x[s:s + 137])
    assert st.n == 1000
    np.testing.assert_allclose(st.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(st.cov, sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(st.features, x.astype(np.float32))
    # two shards with different shifts merge to the same statistics
    a, b = M.FeatureStats(12).update(x[:300]), M.FeatureStats(12).update(x[300:])
    a.merge(b)
    np.testing.assert_allclose(a.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(a.cov, sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        st.update(np.zeros((3, 11)))


def test_statistics_file_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    st = M.FeatureStats(5).update(rng.standard_normal((50, 5)))
    st.save(str(tmp_path / "ref.npz"))
    mu, sigma = M.load_statistics(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(mu, st.mean)
    np.testing.assert_array_equal(sigma, st.cov)


def _kid_reference(x, y, subset_size, num_subsets, seed):
    """Direct double loops over kernel matrices (no vectorised sums), same subset draws."""
    rng = np.random.RandomState(seed)
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    vals = []
    for _ in range(num_subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        m = subset_size
        kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
        sxx = sum(kxx[i, j] for i in range(m) for j in range(m) if i != j)
        syy = sum(kyy[i, j] for i in range(m) for j in range(m) if i != j)
        vals.append((sxx + syy) / (m * (m - 1)) - 2 * kxy.mean())
    return np.mean(vals), np.std(vals)


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(5)
    x, y = _features(rng, 120, 6), _features(rng, 100, 6, shift=0.5)
    got = M.kid(x, y, subset_size=40, num_subsets=5, seed=7)
    mean, std = _kid_reference(x, y, 40, 5, 7)
    np.testing.assert_allclose([got["kid_mean"], got["kid_std"]], [mean, std], rtol=1e-10)
    assert got["kid_mean"] > 0.05
    # same distribution: KID ~ 0 (unbiased), far below the shifted pair
    same = M.kid(rng.standard_normal((200, 6)), rng.standard_normal((200, 6)), subset_size=100,
                 num_subsets=20)
    shifted = M.kid(rng.standard_normal((200, 6)), rng.standard_normal((200, 6)) + 0.5,
                    subset_size=100, num_subsets=20)
    assert abs(same["kid_mean"]) < 0.1 * shifted["kid_mean"]
    with pytest.raises(ValueError, match="subset_size"):
        M.kid(x, y)  # 1000 > 100 samples


def test_precision_recall_identical_disjoint_and_subset():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 8))
    assert M.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    far = x + 1000.0
    assert M.precision_recall(x, far) == {"precision": 0.0, "recall": 0.0}
    # real = two far-apart clusters A (150) and B (50); generated = copies of A only:
    # every generated point is a real point (precision 1); only A's real points are covered
    # by the generated balls, which are A-sized and far from B (recall 150/200).
    a, b = rng.standard_normal((150, 8)), rng.standard_normal((50, 8)) + 100.0
    pr = M.precision_recall(np.concatenate([a, b]), a.copy())
    assert pr["precision"] == 1.0
    assert pr["recall"] == pytest.approx(0.75)
    # reversed roles: generated = A and B, real = A: recall 1, precision 0.75
    pr = M.precision_recall(a, np.concatenate([a, b]))
    assert pr == {"precision": 0.75, "recall": 1.0}


def test_knn_radii_match_brute_force():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 4))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    ref = np.sort(d, axis=1)[:, 3]  # index 0 is the point itself
    np.testing.assert_allclose(M.knn_radii(x, k=3, block=17), ref, rtol=1e-9, atol=1e-12)


def test_clip_score_formula():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    # cosines 1, -1 (clipped to 0), 1/sqrt(2)
    assert M.clip_score(a, b) == pytest.approx(100 * (1 + 0 + 2 ** -0.5) / 3)
