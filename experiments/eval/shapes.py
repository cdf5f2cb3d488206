"""Evaluate a run of the main job (experiments/shapes.py) on the built-in shapes test split.

Run (after `python -m unclip_jax.main --config=experiments/shapes.py --workdir=runs/shapes`):
  python -m unclip_jax.evaluate --workdir=runs/shapes --config=experiments/eval/shapes.py
  Results: runs/shapes/eval/shapes/eval.json (+ tensorboard/, samples.npz, samples.png).
Variants: `:sweep` adds a decoder guidance sweep (fid_vs_guidance.png, CLIP-space FD unless
Inception weights are given); `:smoke` is the test's smoke size (24 captions, 2-3 steps).
Inception FID / KID only with --config.inception_weights=/path/pt_inception-2015-12-05.npz
(nothing is downloaded); without it the image metrics are in the run's own CLIP space.

Evaluation set: the first 512 captions of the shapes test split of the run's own dataset (the
data config the run's CLIP trained on, so the same generator seed and sizes; the test split is
never trained on), real images at the pipeline's output size (64 for the main job).
Sampling: the main job's sample settings (experiments/shapes.py `sample.settings`: diffusion
prior 64 steps best of 2, decoder 50 steps guidance 3.0, upsampler DDIM 15).
Metrics: CLIP-space Frechet distance and CLIP score, precision / recall of CLIP image
embeddings (k=3), prior cosines (diffusion and AR prior against the z_t baseline), shapes
caption accuracy (colour, shape, two-object binding).
"""
from experiments import shapes as main_job
from unclip_jax.eval.config import eval_config


def _main_job_settings() -> dict:
    """The main job's sampling defaults, taken from experiments/shapes.py so the two agree."""
    return dict(main_job.get_config().sample.settings)


def get_config(arg=None):
    if arg not in (None, "", "sweep", "smoke"):
        raise ValueError(f"eval/shapes: unknown variant {arg!r}; use sweep or smoke")
    c = eval_config(name="shapes", data_source="run")  # the run's own shapes dataset
    c.protocol.num_samples = 512
    c.sampling.update(batch_size=64, **_main_job_settings())
    c.metrics.update(kid_subset_size=500)
    if arg == "sweep":
        c.guidance_sweep = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    if arg == "smoke":
        c.protocol.num_samples = 24
        c.sampling.update(batch_size=24, prior_steps="2", num_candidates=1, decoder_steps="3",
                          upsampler_steps="ddim2")
        c.guidance_sweep = (1.0, 3.0)  # 3.0 is the main scale: only 1.0 samples again
        c.save_images = True
        c.grid_images = 8
    return c
