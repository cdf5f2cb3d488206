"""Evaluation: FID / KID / precision-recall on FID-Inception features, CLIP score and CLIP-space
Frechet distance, prior metrics, shapes caption accuracy; the evaluator behind
`python -m unclip_jax.evaluate`, whose sampling the main job's report shares.

  evaluator          evaluate(config, workdir, out): check inputs, sample, gather, score, write
  plan               EvalError, config checks, Plan (the resolved choices of one evaluation)
  load               the trained run: stage directories, local mesh, Pipeline
  dataset            the evaluation set in per-process batches; its cache key
  sampling           images / prior z_i for captions, check_prompts (shapes pixel check of
                     sampled prompts), prior_comparison: shared with recipes/shapes.py's report
  collect            the evaluator's per-batch pass, its accumulator, the gather to Samples
  gather             process_allgather of rows and strings, shapes counts summed over processes
  scores             image metrics, prior cosines and the guidance sweep from Samples
  outputs            eval.json, samples.npz / .png, sweep plot, TensorBoard, reference stats
  inception          Flax FID Inception-v3 (pool3, 2048-d), `InceptionFeatures(params)`
  inception_weights  load / convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local):
                     `load_inception_params(path)`
  metrics            FeatureStats (streaming), frechet_distance, kid, precision_recall,
                     clip_score, clip_encoders, clip_score_images
  prior_metrics      prior_cosines, compare_priors, prior_table
  shapes_accuracy    shapes_accuracy(images, prompts), merge (over batches)
  coco               the zero-shot MS-COCO caption draw (one random caption per image)
Metric modules are numpy / scipy only; importing this package does not import JAX models.
"""
from unclip_jax.eval.metrics import (FeatureStats, clip_score, clip_score_images,
                                     feature_statistics, fid_from_features, fid_from_stats,
                                     frechet_distance, kid, load_statistics, precision_recall)

__all__ = ["FeatureStats", "clip_score", "clip_score_images", "feature_statistics",
           "fid_from_features", "fid_from_stats", "frechet_distance", "kid", "load_statistics",
           "precision_recall"]
