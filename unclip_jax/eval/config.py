"""`eval_config()`: every field `python -m unclip_jax.evaluate` reads, with its default.

experiments/eval/*.py start from it and change what their protocol needs; the evaluator reads
`config.x` directly, so a run's values are this file plus the experiment file.
"""
from __future__ import annotations

import ml_collections

from unclip_jax.stages import UNCLIP_STAGES


def eval_config(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "eval"                   # output folder: <workdir>/eval/<name>
    c.seed = 0
    c.ema = True                      # sample with the EMA weights
    c.num_devices = 0                 # 0: every local device; n: the first n of each process
    # "config": read config.data; "run": the dataset the run's CLIP stage trained on.
    c.data_source = "config"
    c.data = None                     # a data config (unclip_jax.data.default_data_config)
    c.protocol = ml_collections.ConfigDict(dict(
        num_samples=1000, split="test",
        order="first",                # "first", "shuffled" or "coco_draw" (eval.dataset)
        caption_seed=0,
        resolution=0,                 # generated and reference images; 0: the pipeline's output
    ))
    # Stage workdirs overriding <workdir>/<stage> (upsampler: comma-separated, in order).
    c.stages = ml_collections.ConfigDict({k: "" for k in UNCLIP_STAGES})
    # batch_size, preset plus any unclip_jax.inference.SampleSettings field. preset "auto":
    # Karlo's sampling settings (karlo.PRESET) over these fields when the workdir is a converted
    # Karlo; "karlo": always; "none": the fields as they are.
    c.sampling = ml_collections.ConfigDict(dict(batch_size=64, preset="auto"))
    c.guidance_sweep = ()             # decoder guidance scales for the FID / CLIP-score curve
    c.inception_weights = ""          # pytorch-fid's pt_inception-2015-12-05 (.pth or .npz)
    c.reference_stats = ""            # cache of the real images' statistics; "": <out>/...
    c.metrics = ml_collections.ConfigDict(dict(
        fid="auto", kid="auto",       # True, False or "auto" (when inception_weights is set)
        kid_subset_size=1000, kid_subsets=100,
        clip_fd=True, clip_score=True, precision_recall=True, pr_k=3,
        prior=True, prior_ar=True,
        shapes_accuracy="auto",       # "auto": when the evaluation data is the shapes dataset
    ))
    c.save_images = False             # generated images in samples.npz (uint8)
    c.grid_images = 64
    c.update(kw)
    return c
