"""Sample a 2-D Gaussian mixture with its closed-form ideal denoiser, to see the samplers work.

  python -m unclip_jax.tools.demo_sampler [--out=DIR (local or gs://..., default
      $TMPDIR/unclip_demo_sampler)]
      [--steps=50] [--num_samples=4000] [--stat_samples=100000] [--seed=0]

Writes DIR/samples.png (data and each sampler as scatter plots) and DIR/moments.json (mean,
covariance and component masses of each sampler's output against the true ones), and prints the
same. Runs in about ten seconds on CPU. With an ideal denoiser, differences from the truth are
the samplers' own discretisation error plus Monte-Carlo noise: at 50 steps DDPM fixed_small (=
DDIM eta=1) and, less so, DDIM eta=0 shrink the components; Analytic-DPM's one variance per step
fits the average spread, so it restores the wide components and slightly widens the narrowest.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

import io
import json
import os
import tempfile
import time

# JAX is imported in `demo`, after the host setup.
import numpy as np
from PIL import Image, ImageDraw

from unclip_jax import paths

MEANS = np.array([[-0.6, -0.5], [0.6, -0.5], [0.0, 0.55], [0.65, 0.7]], np.float32)
STDS = np.array([0.12, 0.08, 0.15, 0.05], np.float32)
WEIGHTS = np.array([0.3, 0.3, 0.25, 0.15], np.float32)


def true_moments():
    mean = WEIGHTS @ MEANS
    second = sum(w * (s ** 2 * np.eye(2) + np.outer(m, m)) for w, m, s in zip(WEIGHTS, MEANS, STDS))
    return {"mean": mean.tolist(), "cov": (second - np.outer(mean, mean)).tolist(),
            "component_mass": WEIGHTS.tolist(), "component_std": STDS.tolist()}


def measured_moments(x: np.ndarray):
    x = x.astype(np.float64)
    # assign each sample to its most responsible component (components barely overlap)
    logp = (np.log(WEIGHTS) - 0.5 * ((x[:, None] - MEANS) ** 2).sum(-1) / STDS ** 2
            - 2 * np.log(STDS))
    k = logp.argmax(1)
    comp_std = [float(np.sqrt(((x[k == i] - MEANS[i]) ** 2).mean())) if np.any(k == i)
                else float("nan") for i in range(len(WEIGHTS))]
    return {"mean": x.mean(0).tolist(), "cov": np.cov(x.T).tolist(),
            "component_mass": [float(np.mean(k == i)) for i in range(len(WEIGHTS))],
            "component_std": comp_std}


def scatter_panel(x: np.ndarray, title: str, size: int = 300, lim: float = 1.3) -> Image.Image:
    img = Image.new("RGB", (size, size + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), title, fill="black")
    px = ((x + lim) / (2 * lim) * (size - 1)).round().astype(int)
    for u, v in px:
        if 0 <= u < size and 0 <= v < size:
            draw.point((u, 20 + size - 1 - v), fill=(30, 80, 200))
    draw.rectangle([0, 20, size - 1, size + 19], outline="gray")
    return img


def demo(out: str, steps: int = 50, num_samples: int = 4000, stat_samples: int = 100_000,
         seed: int = 0) -> dict:
    """Write OUT/samples.png and OUT/moments.json, print the table; returns the moments."""
    import jax

    from unclip_jax import diffusion as D
    from unclip_jax.diffusion.toy import gaussian_mixture_denoiser, sample_gaussian_mixture

    paths.check_bucket(out)   # before the work, not at the first write
    t_start = time.time()

    train = D.make_schedule("cosine", 1000)
    fast = D.respace(train, str(steps))
    shape = (num_samples, 2)
    rng_data, rng_stat, rng_sample = jax.random.split(jax.random.key(seed), 3)
    data = np.asarray(sample_gaussian_mixture(rng_data, num_samples, MEANS, STDS, WEIGHTS))
    model = gaussian_mixture_denoiser(train, MEANS, STDS, WEIGHTS, parameterization="eps")
    # Analytic-DPM's statistic from separate data; its error is amplified at the noisiest steps.
    stat_data = sample_gaussian_mixture(rng_stat, stat_samples, MEANS, STDS, WEIGHTS)
    eps_sq = jax.jit(lambda d, r: D.estimate_eps_sq_norm(model, fast, d, r))(
        stat_data, jax.random.fold_in(rng_stat, 1))

    runs = {
        f"ddpm_fixed_small_{steps}": {"method": "ddpm", "var_type": "fixed_small"},
        f"ddpm_analytic_{steps}": {"method": "ddpm", "var_type": "analytic",
                                        "eps_sq_norm": eps_sq},
        f"ddim_eta0_{steps}": {"method": "ddim", "eta": 0.0},
        f"ddim_eta1_{steps}": {"method": "ddim", "eta": 1.0},
    }
    results = {"true": true_moments(), "data_sample": measured_moments(data)}
    panels = [scatter_panel(data, "data")]
    for name, kw in runs.items():
        x = jax.jit(lambda r, kw=kw: D.sample(model, fast, shape, r, **kw))(rng_sample)
        x = np.asarray(x)
        results[name] = measured_moments(x)
        panels.append(scatter_panel(x, name))

    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * p.width, 0))
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    paths.write_bytes(os.path.join(out, "samples.png"), png.getvalue())   # each file whole
    paths.write_text(os.path.join(out, "moments.json"), json.dumps(results, indent=2))

    fmt = lambda v: "[" + ", ".join(f"{u:+.3f}" for u in v) + "]"
    print(f"{'':24s} {'mean':18s} {'cov diag':18s} {'component mass':34s} component std")
    for name, r in results.items():
        print(f"{name:24s} {fmt(r['mean']):18s} {fmt(np.diag(r['cov'])):18s} "
              f"{fmt(r['component_mass']):34s} {fmt(r['component_std'])}")
    print(f"wrote {out}/samples.png and moments.json in {time.time() - t_start:.1f}s")
    return results


def main(argv):
    if len(argv) > 1:
        from absl import app
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import flags
    f = flags.FLAGS
    demo(f.out, f.steps, f.num_samples, f.stat_samples, f.seed)


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("out", os.path.join(tempfile.gettempdir(), "unclip_demo_sampler"),
                        "Output directory for samples.png and moments.json.")
    flags.DEFINE_integer("steps", 50, "Sampling steps of every sampler (respaced from 1000).")
    flags.DEFINE_integer("num_samples", 4000, "Points drawn by each sampler (and from the data).")
    flags.DEFINE_integer("stat_samples", 100_000, "Data points for Analytic-DPM's E||eps||^2 "
                         "(2-D needs many).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    from unclip_jax import console
    console.run_app(main)
