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
import ml_collections

from experiments import shapes as main_job


def _main_job_settings() -> dict:
    """The main job's sampling defaults, taken from experiments/shapes.py so the two agree."""
    return dict(main_job.get_config().sample.settings)


def get_config(arg=None):
    if arg not in (None, "", "sweep", "smoke"):
        raise ValueError(f"eval/shapes: unknown variant {arg!r}; use sweep or smoke")
    c = ml_collections.ConfigDict()
    c.name = "shapes"
    c.seed = 0
    c.ema = True
    c.data_source = "run"             # the run's own shapes dataset (its CLIP stage's data)
    c.protocol = ml_collections.ConfigDict(dict(
        num_samples=512, split="test", order="first", caption_seed=0,
        resolution=0,                 # 0: the pipeline's output size
    ))
    c.stages = ml_collections.ConfigDict(dict(clip="", diffusion_prior="", ar_prior="",
                                              decoder="", upsampler=""))
    c.sampling = ml_collections.ConfigDict(dict(batch_size=64, **_main_job_settings()))
    c.guidance_sweep = ()
    c.inception_weights = ""          # set to compute Inception FID / KID
    c.reference_stats = ""            # default: <out>/reference_stats.npz
    c.metrics = ml_collections.ConfigDict(dict(
        fid="auto", kid="auto", kid_subset_size=500, kid_subsets=100,
        clip_fd=True, clip_score=True, precision_recall=True, pr_k=3,
        prior=True, prior_ar=True, shapes_accuracy="auto",
    ))
    c.save_images = False             # images in samples.npz (uint8)
    c.grid_images = 64
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
