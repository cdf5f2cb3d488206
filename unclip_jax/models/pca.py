"""PCA and per-dimension quantisation of CLIP image embeddings (for the priors).

PCA is fitted streaming: `PCAStats` accumulates the count, the sum and the sum of outer products
(around a shift) in float64 over batches, and `merged_over_processes` combines every process's
(each reads its own part of the data), so the data never has to fit in one host's memory;
`finalize()` eigen-decomposes the covariance once. Components are ordered by decreasing
eigenvalue, with a fixed sign (largest-magnitude entry positive) so fits are reproducible.

The quantiser gives each dimension `num_buckets` equal-mass buckets (edges = quantiles of the
training values) and dequantises to each bucket's centre = the MEAN of the training values that
fell in it (the edge midpoint for a bucket no training value fell in). A value inside the fitted
range is thus off by at most its bucket's width.

As a command, fits both to an embedding cache (`python -m unclip_jax.embed`) and writes
DIR/pca_<field>.npz and DIR/quantizer_<field>.npz beside it:

  python -m unclip_jax.models.pca --cache=DIR [--split=train] [--field=image_embedding]
      [--buckets=1024] [--batch=65536]
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PCA:
    mean: np.ndarray          # [D]
    components: np.ndarray    # [D, D], row i = i-th principal direction
    eigenvalues: np.ndarray   # [D], decreasing (covariance eigenvalues, ddof=1)
    count: int

    def transform(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
        """Coordinates of x on the first k components: [..., D] -> [..., k]."""
        comps = self.components[:k]
        return ((np.asarray(x, np.float64) - self.mean) @ comps.T).astype(np.float32)

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Back to embedding space from the first z.shape[-1] coordinates."""
        z = np.asarray(z, np.float64)
        return (z @ self.components[:z.shape[-1]] + self.mean).astype(np.float32)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.eigenvalues / self.eigenvalues.sum()

    def save(self, path: str) -> None:
        from unclip_jax import paths   # local or gs:// (beside an embedding cache)
        paths.save_npz(path, mean=self.mean, components=self.components,
                       eigenvalues=self.eigenvalues, count=self.count)

    @classmethod
    def load(cls, path: str) -> "PCA":
        from unclip_jax import paths
        with paths.np_load(path) as f:
            return cls(f["mean"], f["components"], f["eigenvalues"], int(f["count"]))


@dataclasses.dataclass
class PCAStats:
    """Streaming sufficient statistics; `update` per batch, `merge` across processes.

    Sums are taken around `shift` (the first batch's mean): raw moments of data far from the
    origin would cancel catastrophically in float64 for the small eigenvalues.
    """

    dim: int
    count: int = 0
    shift: np.ndarray | None = None
    total: np.ndarray | None = None   # sum of (x - shift)
    outer: np.ndarray | None = None   # sum of (x - shift)(x - shift)^T

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, x: np.ndarray) -> "PCAStats":
        x = np.asarray(x, np.float64).reshape(-1, self.dim)
        if len(x) == 0:
            return self
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def _shifted(self, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(total, outer) re-expressed around another shift."""
        d = self.shift - shift
        total = self.total + self.count * d
        outer = (self.outer + np.outer(d, self.total) + np.outer(self.total, d)
                 + self.count * np.outer(d, d))
        return total, outer

    def merge(self, other: "PCAStats") -> "PCAStats":
        if other.shift is None:
            return self
        if self.shift is None:
            return other
        total, outer = other._shifted(self.shift)
        return PCAStats(self.dim, self.count + other.count, self.shift.copy(),
                        self.total + total, self.outer + outer)

    def merged_over_processes(self) -> "PCAStats":
        """Every process's statistics merged in process order, on every process (a collective:
        all processes call it; one with no rows takes part with an empty one)."""
        import jax
        if jax.process_count() == 1:
            return self
        empty = self.shift is None
        shift = np.zeros(self.dim) if empty else self.shift
        counts = gather_float64(np.float64(0 if empty else self.count))
        shifts, totals, outers = (gather_float64(a) for a in (shift, self.total, self.outer))
        out = PCAStats(self.dim)
        for n, sh, t, o in zip(counts.reshape(-1), shifts, totals, outers):
            if n:
                out = out.merge(PCAStats(self.dim, int(n), sh, t, o))
        return out

    def finalize(self) -> PCA:
        if self.count < 2:
            raise ValueError(f"PCA needs at least 2 examples, got {self.count}")
        centred = self.total / self.count
        cov = (self.outer - self.count * np.outer(centred, centred)) / (self.count - 1)
        eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(eigvals)[::-1]
        eigvals, comps = np.clip(eigvals[order], 0, None), eigvecs[:, order].T
        signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
        return PCA(self.shift + centred, comps * signs[:, None], eigvals, self.count)


def gather_float64(x) -> np.ndarray:
    """`x` of every process stacked [P, ...], bit-exact: JAX without x64 would round float64 to
    float32 in transit, so the bits travel as uint32 pairs."""
    from jax.experimental import multihost_utils
    x = np.ascontiguousarray(x, np.float64)
    bits = x.reshape(-1).view(np.uint32)
    out = np.asarray(multihost_utils.process_allgather(bits, tiled=False))
    return np.ascontiguousarray(out).view(np.float64).reshape((-1,) + x.shape)


def fit_pca(batches, dim: int | None = None) -> PCA:
    """PCA of an iterable of [B, D] arrays (or one array)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    stats = None
    for b in batches:
        b = np.asarray(b)
        stats = stats or PCAStats(dim or b.shape[-1])
        stats.update(b)
    if stats is None:
        raise ValueError("fit_pca got no batches")
    return stats.finalize()


def relative_mse(pca: PCA, x: np.ndarray | None = None, ks=None) -> dict[int, float]:
    """Relative reconstruction MSE, ||x - x_k||^2 / ||x - mean||^2, per kept component count k.

    Without x it is computed from the eigenvalues (exact for the fitting data).
    """
    d = len(pca.eigenvalues)
    ks = list(ks) if ks is not None else sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, d} & set(
        range(1, d + 1)))
    if x is None:
        total = pca.eigenvalues.sum()
        return {k: float(pca.eigenvalues[k:].sum() / total) for k in ks}
    x = np.asarray(x, np.float64)
    denom = ((x - pca.mean) ** 2).sum()
    return {k: float(((x - pca.inverse_transform(pca.transform(x, k))) ** 2).sum() / denom)
            for k in ks}


# --------------------------------------------------------------------------------- quantisation
@dataclasses.dataclass(frozen=True)
class Quantizer:
    edges: np.ndarray     # [D, N + 1], per-dimension quantiles
    centres: np.ndarray   # [D, N], mean training value per bucket

    @property
    def num_buckets(self) -> int:
        return self.centres.shape[1]

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """[..., D] float -> [..., D] int32 bucket ids (out-of-range values clip to the ends)."""
        x = np.asarray(x)
        flat = x.reshape(-1, x.shape[-1])
        q = np.empty(flat.shape, np.int32)
        for d in range(flat.shape[1]):
            q[:, d] = np.searchsorted(self.edges[d, 1:-1], flat[:, d], side="right")
        return q.reshape(x.shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q)
        return np.take_along_axis(self.centres, q.reshape(-1, q.shape[-1]).T, 1).T.reshape(
            q.shape).astype(np.float32)

    def save(self, path: str) -> None:
        from unclip_jax import paths
        paths.save_npz(path, edges=self.edges, centres=self.centres)

    @classmethod
    def load(cls, path: str) -> "Quantizer":
        from unclip_jax import paths
        with paths.np_load(path) as f:
            return cls(f["edges"], f["centres"])


def fit_quantizer(x: np.ndarray, num_buckets: int = 1024) -> Quantizer:
    """Equal-mass buckets per dimension from samples x [N, D] (a subsample is fine)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < num_buckets:
        raise ValueError(f"fit_quantizer needs [N, D] samples with N >= num_buckets "
                         f"({num_buckets}), got shape {x.shape}")
    edges = np.quantile(x, np.linspace(0, 1, num_buckets + 1), axis=0).T  # [D, N+1]
    centres = (edges[:, :-1] + edges[:, 1:]) / 2
    for d in range(x.shape[1]):
        q = np.searchsorted(edges[d, 1:-1], x[:, d], side="right")
        n = np.bincount(q, minlength=num_buckets)
        s = np.bincount(q, weights=x[:, d], minlength=num_buckets)
        centres[d] = np.where(n > 0, s / np.maximum(n, 1), centres[d])
    return Quantizer(edges, centres)


def fit_cache(cache_dir: str, split: str = "train", field: str = "image_embedding",
              buckets: int = 1024, batch: int = 65536, log=print) -> PCA:
    """Fit the PCA (and the quantiser, given at least `buckets` rows) of `field` in an embedding
    cache; write them as CACHE_DIR/pca_<field>.npz and quantizer_<field>.npz."""
    import os

    from unclip_jax.data import cache

    x = cache.load_field(cache_dir, split, field)
    pca = fit_pca(x[i:i + batch] for i in range(0, len(x), batch))
    pca.save(os.path.join(cache_dir, f"pca_{field}.npz"))
    for k, v in relative_mse(pca).items():
        log(f"k={k:5d} relative MSE {v:.5f}")
    if len(x) >= buckets:
        fit_quantizer(np.asarray(x), buckets).save(
            os.path.join(cache_dir, f"quantizer_{field}.npz"))
    return pca


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    fit_cache(f.cache, f.split, f.field, f.buckets, f.batch)


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("cache", None, "Embedding cache directory (python -m unclip_jax.embed).")
    flags.DEFINE_string("split", "train", "Split of the cache to fit on.")
    flags.DEFINE_string("field", "image_embedding", "Field of the cache to fit.")
    flags.DEFINE_integer("buckets", 1024, "Quantiser buckets per dimension (skipped with fewer "
                         "rows than this).")
    flags.DEFINE_integer("batch", 65536, "Rows per streaming PCA update.")
    flags.mark_flags_as_required(["cache"])
    from unclip_jax import console
    console.run_app(main)
