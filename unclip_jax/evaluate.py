r"""Evaluate a trained unCLIP run: sample for an evaluation set's captions and score the samples.

  python -m unclip_jax.evaluate --workdir=runs/shapes --config=experiments/eval/shapes.py \
      [--out=DIR] [--config.protocol.num_samples=256] [--config.inception_weights=inc.npz]

`--workdir` is the main job's workdir (stages clip/, diffusion_prior/, ar_prior/, decoder/,
upsampler/; EMA weights); `config.stages.<name>` overrides single stage directories (then the
workdir may hold nothing). A converted Karlo workdir (`python -m unclip_jax.convert karlo`, with
its vision tower: --image_encoder) is taken as it is, sampled with Karlo's preset unless
`config.sampling.preset` is "none", its CLIP metrics in Karlo's own ViT-L/14 space. Output (default `<workdir>/eval/<config.name>`, so TensorBoard on the
run shows it too):
  eval.json          every metric below, the settings, checkpoint steps, counts, timings
  samples.npz        per caption: caption, index, text_embedding (z_t), true_image_embedding
                     (CLIP z_i of the real image), prior_diffusion / prior_ar (sampled z_i),
                     gen_clip (CLIP z_i of the generated image), gen_inception / real_inception
                     (when Inception runs), gen_clip_g<scale> / gen_inception_g<scale> (each
                     sweep scale), images (uint8, with config.save_images)
  samples.png        the first generated images (grid, one caption each, captions in samples.txt)
  tensorboard/       the scalars of eval.json, step = the decoder's checkpoint step
  fid_vs_guidance.png  with config.guidance_sweep: FID (or CLIP-space FD when no Inception weights
                     are configured; the plot says which) against the decoder guidance scale
  reference_stats.npz  Inception statistics (and features) of the real images, reused on re-runs
                     of the same evaluation set (or config.reference_stats names the file)

Metrics (config.metrics selects):
  fid / kid          FID and KID with the FID Inception (eval.inception) from the local file
                     config.inception_weights; nothing is downloaded, a missing file is an error.
                     fid="auto": only when inception_weights is set.
  clip_fd            Frechet distance between CLIP image embeddings (the run's own CLIP) of the
                     generated and the real images
  clip_score         100 * mean max(cos(CLIP(generated image), CLIP(caption)), 0); also reported
                     for the real images (clip_score_real) as the reachable level
  precision_recall   Kynkaanniemi et al. on Inception features when Inception runs, else on CLIP
                     image embeddings (eval.json says which: pr_features)
  prior              cos(sampled z_i, true z_i) against cos(z_t, true z_i) for the diffusion prior
                     and (when the run has one) the AR prior, true z_i = CLIP of the real image
  shapes_accuracy    colour / shape / binding accuracy from pixels (built-in shapes data only)

Every generated image is rounded to uint8 (as a PNG would be) before any feature is taken, so the
saved images reproduce the numbers exactly.

Devices and processes: the batch of each sampling call is sharded over this process's devices
(a data mesh of its local devices); with several processes (`--coordinator_address`, or a
detected cluster) each process evaluates its own slice of the captions (its share of the source,
interleaved) and per-example features are gathered on process 0 with
`multihost_utils.process_allgather` (rows padded to the largest slice, then trimmed); only
process 0 computes the metrics and writes files.

Bad input (missing workdir or stage, missing weights file, an empty evaluation set, unknown
sampling fields) is reported in one line (exit code 2) before anything is written.

The code is in unclip_jax/eval (evaluator.evaluate(config, workdir, out) runs it in-process).
"""
from __future__ import annotations

import sys

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator

from absl import flags
from ml_collections import config_flags

def define_flags(argv: list[str]) -> flags.FlagValues:
    """The command's flags in their own FlagValues, so run() can parse in-process (tests, other
    tools) without touching absl's global flags."""
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.x overrides from it (default: sys.argv, which
    # is not our argv when run() is called in-process).
    config_flags.DEFINE_config_file("config", None, "Evaluation config (experiments/eval/*.py), "
                                    "overridable with --config.x.y=value.", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "The main job's workdir (trained stages).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/eval/<config.name>).",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (multi-process runs).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None,
                         "Number of processes (with --coordinator_address).", flag_values=fv)
    flags.DEFINE_integer("process_id", None,
                         "This process's index (with --coordinator_address).", flag_values=fv)
    return fv


def run(argv: list[str], log=print) -> dict:
    """Parse `--workdir --config [--out] [--config.x=...]` and evaluate."""
    from unclip_jax.eval.plan import EvalError
    argv = ["unclip_jax.evaluate"] + list(argv)
    fv = define_flags(argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise EvalError(f"bad arguments: {e}") from e
    if fv.config is None or not fv.workdir:
        raise EvalError("--config and --workdir are required")
    from unclip_jax import distributed
    from unclip_jax.eval.evaluator import evaluate
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    return evaluate(fv.config, fv.workdir, fv.out, log=log)


def main(argv: list[str]) -> int:
    from unclip_jax.console import HELP_FLAGS
    if any(a in HELP_FLAGS for a in argv):
        print(__doc__)
        print(define_flags(["unclip_jax.evaluate"]).get_help())
        return 0
    try:
        res = run(argv)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        msg = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if "out" in res:
        print(f"wrote {res['out']}/eval.json ({res['num_samples']} captions, step {res['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
