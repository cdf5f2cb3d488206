"""Evaluation: FID / KID / precision-recall on FID-Inception features, CLIP score and CLIP-space
Frechet distance, prior metrics, shapes caption accuracy.

  inception          Flax FID Inception-v3 (pool3, 2048-d), `InceptionFeatures(params)`
  inception_weights  load / convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local):
                     `load_inception_params(path)`
  metrics            FeatureStats (streaming), frechet_distance, kid, precision_recall,
                     clip_score, clip_encoders, clip_score_images
  prior_metrics      prior_cosines, evaluate_prior, diffusion_prior_sampler, ar_prior_sampler
  shapes_accuracy    shapes_accuracy(images, prompts)
  coco               the zero-shot MS-COCO caption draw (one random caption per image)
Metric modules are numpy / scipy only; importing this package does not import JAX models.
"""
from unclip_jax.eval.metrics import (FeatureStats, clip_score, clip_score_images,
                                     feature_statistics, fid_from_features, fid_from_stats,
                                     frechet_distance, kid, load_statistics, precision_recall)

__all__ = ["FeatureStats", "clip_score", "clip_score_images", "feature_statistics",
           "fid_from_features", "fid_from_stats", "frechet_distance", "kid", "load_statistics",
           "precision_recall"]
