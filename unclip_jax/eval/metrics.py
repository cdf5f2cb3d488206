"""Sample-quality metrics on feature vectors (numpy / scipy, float64): FID, KID, precision /
recall, CLIP score. Pure functions; features come from `eval.inception` (pool3, 2048-d) or from
CLIP's image encoder (Frechet distance in CLIP space is the same code on other features).

References: FID as in pytorch-fid (`calculate_frechet_distance`); KID as in Binkowski et al. 2018
and torch-fidelity (unbiased MMD^2, cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, mean / std
over 100 subsets of 1000); precision / recall as in Kynkaanniemi et al. 2019 (k-NN hyperspheres,
k = 3); CLIP score as in torchmetrics (100 * max(cos(image, text), 0), averaged).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import linalg


# ----------------------------------------------------------------------------- statistics
class FeatureStats:
    """Streaming mean / covariance of feature vectors: `update(batch)` as images are generated,
    so 30k x 2048 features need not be held (only D + D^2 float64 sums).

    Sums are kept about a shift (the first batch's mean), which avoids the cancellation of
    sum(x x^T) - n mu mu^T when features have a large mean. `keep_features=True` also keeps the
    features (KID and precision / recall need them). `merge` combines stats from several
    processes / shards."""

    def __init__(self, dim: int, keep_features: bool = False):
        self.dim = int(dim)
        self.n = 0
        self.shift = np.zeros(self.dim)
        self.sum = np.zeros(self.dim)
        self.outer = np.zeros((self.dim, self.dim))
        self._kept: list[np.ndarray] | None = [] if keep_features else None

    def update(self, features) -> "FeatureStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: expected features [N, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("FeatureStats: features contain NaN or inf")
        if x.shape[0] == 0:
            return self
        if self.n == 0:
            self.shift = x.mean(0)
        y = x - self.shift
        self.n += x.shape[0]
        self.sum += y.sum(0)
        self.outer += y.T @ y
        if self._kept is not None:
            self._kept.append(np.asarray(features, np.float32))
        return self

    def _shifted_to(self, shift):
        d = self.shift - shift
        s = self.sum + self.n * d
        o = self.outer + np.outer(self.sum, d) + np.outer(d, self.sum) + self.n * np.outer(d, d)
        return s, o

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims {self.dim} and {other.dim} differ")
        if other.n == 0:
            return self
        if self.n == 0:
            self.shift = other.shift.copy()
        s, o = other._shifted_to(self.shift)
        self.n += other.n
        self.sum += s
        self.outer += o
        if self._kept is not None and other._kept is not None:
            self._kept.extend(other._kept)
        return self

    @property
    def mean(self) -> np.ndarray:
        self._check(1)
        return self.shift + self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof=1), as np.cov(features, rowvar=False) in pytorch-fid."""
        self._check(2)
        m = self.sum / self.n
        c = (self.outer - self.n * np.outer(m, m)) / (self.n - 1)
        return 0.5 * (c + c.T)

    @property
    def features(self) -> np.ndarray:
        if self._kept is None:
            raise ValueError("FeatureStats was built without keep_features=True")
        return (np.concatenate(self._kept, 0) if self._kept
                else np.zeros((0, self.dim), np.float32))

    def _check(self, need: int):
        if self.n < need:
            raise ValueError(f"FeatureStats: {self.n} feature vectors, need at least {need}")

    def save(self, path: str) -> None:
        """pytorch-fid's .npz layout (mu, sigma) plus the count (a local path or a URL)."""
        from unclip_jax import paths
        paths.save_npz(path, mu=self.mean, sigma=self.cov, n=np.int64(self.n))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of features [N, D] in float64, in one pass."""
    x = np.asarray(features, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz written by FeatureStats.save or by pytorch-fid --save-stats
    (a local path or a URL)."""
    from unclip_jax import paths
    with paths.np_load(path) as f:
        for k in ("mu", "sigma"):
            if k not in f.files:
                raise KeyError(f"statistics file {path!r} has no {k!r} (has {f.files})")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


# ------------------------------------------------------------------------------------ FID
def _psd_eigenvalues(s, what: str) -> tuple[np.ndarray, np.ndarray]:
    """eigh of a symmetric matrix that should be PSD: (eigenvalues with rounding-level negatives
    set to 0, eigenvectors); clearly negative ones are an error."""
    w, v = linalg.eigh(s)
    top = max(float(np.max(np.abs(w))), np.finfo(np.float64).tiny)
    if w[0] < -1e-6 * top:
        raise ValueError(f"frechet_distance: {what} has an eigenvalue of {w[0]:.3g} (largest "
                         f"{top:.3g}); covariances are not PSD")
    return np.clip(w, 0.0, None), v


def trace_sqrt_product(s1, s2) -> float:
    """tr (S1 S2)^(1/2) for symmetric PSD S1, S2, exactly and in eigh's time, not sqrtm's.

    With S1 = A A^T (A = V L^(1/2) over S1's nonzero eigenvalues), the nonzero eigenvalues of
    S1 S2 are those of the symmetric PSD r x r matrix A^T S2 A (r = rank S1: the sample count
    minus one when there are fewer samples than dimensions), so the trace of the square root is
    the sum of their square roots. Unlike sqrtm(S1 S2) (pytorch-fid) this stays accurate when
    the product is singular."""
    w, v = _psd_eigenvalues(s1, "sigma1")
    keep = w > w[-1] * w.size * np.finfo(np.float64).eps
    a = v[:, keep] * np.sqrt(w[keep])
    m = a.T @ s2 @ a
    ev, _ = _psd_eigenvalues((m + m.T) / 2, "A^T sigma2 A")
    return float(np.sqrt(ev).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (pytorch-fid's
    calculate_frechet_distance; the trace of the square root from eigenvalues, see
    trace_sqrt_product: exact where pytorch-fid's sqrtm needs an eps retry, and on 2048-d
    Inception statistics an order of magnitude cheaper)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape} do not match")
    for name, x in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(x).all():
            raise ValueError(f"frechet_distance: {name} has non-finite values")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid_from_features(feats1, feats2) -> float:
    """Frechet distance between two feature sets (Inception pool3 -> FID; CLIP image
    embeddings -> "CLIP-FD")."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


# ------------------------------------------------------------------------------------ KID
def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x, y, **kernel_kw) -> float:
    """Unbiased MMD^2 between equal-sized samples x, y [m, D] with the polynomial kernel:
    mean of k(x, x') and k(y, y') off the diagonal, minus twice the mean of k(x, y)."""
    m = x.shape[0]
    kxx, kyy = polynomial_kernel(x, x, **kernel_kw), polynomial_kernel(y, y, **kernel_kw)
    kxy = polynomial_kernel(x, y, **kernel_kw)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.sum() / (m * m))


def kid(feats1, feats2, subset_size: int = 1000, num_subsets: int = 100, seed: int = 2020,
        degree: int = 3, coef0: float = 1.0) -> dict:
    """Kernel Inception Distance: {"kid_mean", "kid_std"} of unbiased MMD^2 over `num_subsets`
    random subsets (without replacement) of `subset_size` from each set (torch-fidelity's
    defaults, including its seed 2020 and numpy RandomState draws)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.shape[1:] != f2.shape[1:]:
        raise ValueError(f"kid: feature dims differ: {f1.shape} vs {f2.shape}")
    if subset_size < 2 or subset_size > min(len(f1), len(f2)):
        raise ValueError(f"kid: subset_size {subset_size} must be in [2, min(N1, N2)] = "
                         f"[2, {min(len(f1), len(f2))}]; pass a smaller subset_size")
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        a = f1[rng.choice(len(f1), subset_size, replace=False)]
        b = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(a, b, degree=degree, coef0=coef0)
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std())}


# ----------------------------------------------------------------------- precision / recall
def _sq_dists(a, b):
    """Squared euclidean distances [len(a), len(b)] in float64, clamped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(feats, k: int = 3, block: int = 2048) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point (the point itself,
    at distance 0, is excluded by taking the (k+1)-th smallest)."""
    x = np.asarray(feats, np.float64)
    if len(x) <= k:
        raise ValueError(f"knn_radii: need more than k={k} points, got {len(x)}")
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        d = _sq_dists(x[s:s + block], x)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(query, support, radii, block: int = 2048) -> float:
    """Fraction of `query` points inside at least one support hypersphere (d^2 <= r^2)."""
    inside = np.zeros(len(query), bool)
    for s in range(0, len(query), block):
        d = _sq_dists(query[s:s + block], support)
        inside[s:s + block] = (d <= radii[None, :]).any(1)
    return float(inside.mean())


def precision_recall(real_feats, gen_feats, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of generated
    samples inside the real manifold (union of k-NN balls of the real samples), recall = share of
    real samples inside the generated manifold. Costs O(N^2 D); blocked to bound memory."""
    r, g = np.asarray(real_feats, np.float64), np.asarray(gen_feats, np.float64)
    if r.shape[1:] != g.shape[1:]:
        raise ValueError(f"precision_recall: feature dims differ: {r.shape} vs {g.shape}")
    return {"precision": _coverage(g, r, knn_radii(r, k)),
            "recall": _coverage(r, g, knn_radii(g, k))}


# ------------------------------------------------------------------------------ CLIP score
def clip_score(image_emb, text_emb) -> float:
    """100 * mean over pairs of max(cos(image_i, text_i), 0) (torchmetrics' CLIPScore)."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"clip_score: expected paired embeddings [N, E], got {a.shape} and "
                         f"{b.shape}")
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    return float(100.0 * np.maximum(cos, 0.0).mean())


def _embedding(out):
    return np.asarray(out["embedding"] if isinstance(out, dict) else out, np.float64)


def encode_in_batches(encode: Callable, inputs, batch_size: int) -> np.ndarray:
    """Apply `encode` (array -> embeddings, or a dict with "embedding") over batches."""
    inputs = np.asarray(inputs)
    return np.concatenate([_embedding(encode(inputs[s:s + batch_size]))
                           for s in range(0, len(inputs), batch_size)], 0)


def clip_encoders(model, params) -> tuple[Callable, Callable]:
    """Jitted (encode_image, encode_text) of our CLIP (`unclip_jax.models.clip.CLIP`):
    images in [-1, 1] -> embeddings; tokens -> embeddings."""
    import jax

    enc_i = jax.jit(lambda x: model.apply({"params": params}, x,
                                          method=type(model).encode_image)["embedding"])
    enc_t = jax.jit(lambda t: model.apply({"params": params}, t,
                                          method=type(model).encode_text)["embedding"])
    return enc_i, enc_t


def clip_score_images(images, tokens, encode_image: Callable, encode_text: Callable,
                      batch_size: int = 64) -> float:
    """CLIP score of images [N, H, W, 3] and their prompts' tokens [N, L], with our CLIP's
    encoders passed in (see `clip_encoders`)."""
    if len(images) != len(tokens):
        raise ValueError(f"clip_score_images: {len(images)} images but {len(tokens)} prompts")
    return clip_score(encode_in_batches(encode_image, images, batch_size),
                      encode_in_batches(encode_text, tokens, batch_size))
