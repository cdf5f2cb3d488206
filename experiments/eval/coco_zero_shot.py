"""Zero-shot MS-COCO FID at 256x256: the paper's protocol (Ramesh et al. 2022, after GLIDE).

Protocol: 30,000 captions from the MS-COCO 2014 validation set, one random caption per image
(distinct images drawn with a fixed seed; `unclip_jax.eval.coco.draw_captions`); each generated
at 256x256 by the full pipeline (prior -> 64x64 decoder with guidance 1.25 -> 64->256 upsampler);
FID between the 30k samples and reference statistics of the validation images (shorter side
resized to 256 and centre-cropped), both through the standard FID Inception
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth; `eval.inception_weights` documents where it
comes from and converts it to .npz; nothing is downloaded). Paper: diffusion prior 10.39,
AR prior 10.63, GLIDE 12.24. A sweep over decoder guidance scales gives the FID/CLIP-score curve.

Run:
  python -m unclip_jax.evaluate --workdir=runs/coco_eval \
      --config=experiments/eval/coco_zero_shot.py \
      --config.inception_weights=/path/pt_inception-2015-12-05.npz \
      --config.stages.diffusion_prior=runs/prior --config.stages.decoder=runs/decoder_64 \
      --config.stages.upsampler=runs/upsampler_256 --config.stages.clip=runs/clip
  (config.stages.* override stage directories; unset ones come from --workdir, and the output
  goes to <workdir>/eval/coco_zero_shot unless --out is given.) AR prior: set
  --config.stages.ar_prior=... and --config.sampling.prior=ar.
  Variants: `:folder` reads a local folder instead of tfds; `:smoke` shrinks everything
  (200 captions, 4 steps) for a smoke run.

Data (no TensorFlow here, so tfds is read through `tfds.data_source`, which needs the dataset
prepared as array_record; nothing is downloaded at evaluation time):
  - tfds: build `coco_captions` once where the COCO 2014 files are available:
        tfds build coco_captions --file_format=array_record --data_dir=$DATA
    ($DATA may then be copied to gs://...: each process reads a local copy of the prepared
    folder.) The 2014 validation images are its splits val + test + restval (Karpathy split
    names, 40,504 images). (tfds `coco/2014` / `coco/2017` carry no captions.)
  - folder: <path>/captions.jsonl with one line per validation image,
        {"file": "COCO_val2014_000000000042.jpg", "captions": ["...", ...]}
    (e.g. written from annotations/captions_val2014.json), images beside it.
Reference statistics of the drawn validation images are computed once into `reference_stats`
(mu, sigma, n and the features, which KID needs; default <out>/reference_stats.npz) and reused;
a pytorch-fid .npz (mu, sigma) of the same images works too for FID.
The `:folder` variant draws the same way from the folder (images in captions.jsonl order, a
seeded random caption of each), so one seed gives one set of (image, caption) pairs.
"""
from unclip_jax.data import default_data_config
from unclip_jax.eval.config import eval_config

GUIDANCE_SWEEP = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def get_config(arg=None):
    c = eval_config(name="coco_zero_shot")

    # --- caption draw
    c.protocol.update(
        num_samples=30_000,          # captions = images (one caption per image)
        caption_seed=0,              # eval.coco.draw_captions(seed)
        order="coco_draw",           # distinct images, one random caption each (tfds)
        split="val+test+restval",    # coco_captions' split names for the 2014 validation set
        resolution=256,              # generated and reference images
    )

    # --- data (validation images + all their captions)
    if arg in (None, "", "smoke", "tfds"):
        c.data = default_data_config("tfds")
        c.data.tfds_name = "coco_captions"
        c.data.image_key = "image"
        c.data.caption_key = "captions"      # Sequence({"text", "id"}): eval.coco.caption_texts
    elif arg == "folder":
        c.data = default_data_config("folder")
        c.data.path = ""                     # folder with captions.jsonl ("captions" lists)
        c.protocol.split = "val2014"         # replaces "{split}" in data.path, if present
    else:
        raise ValueError(f"coco_zero_shot: unknown variant {arg!r}; use tfds, folder, smoke")
    c.data.resolution = 256

    # --- generation (paper: prior 64 steps analytic, best of 2; decoder 250 steps guidance 1.25;
    #     64->256 upsampler 27 steps DDIM)
    c.sampling.update(dict(   # batch_size + unclip_jax.inference.SampleSettings
        batch_size=64, prior="diffusion",
        prior_steps="64", prior_guidance=1.0, num_candidates=2,
        decoder_steps="250", decoder_guidance=1.25,
        upsampler_steps="ddim27",
    ))
    c.guidance_sweep = GUIDANCE_SWEEP     # decoder guidance scales for the FID/CLIP-score curve

    # --- metrics
    # inception_weights: pt_inception-2015-12-05-6726825d.pth or its .npz (required: FID is on)
    c.metrics.update(
        fid="true", kid="true",
        precision_recall=False,           # O(N^2) on 30k features: off by default
        shapes_accuracy="false",
    )

    if arg == "smoke":
        c.protocol.num_samples = 200
        c.sampling.update(batch_size=8, prior_steps="4", decoder_steps="4",
                          upsampler_steps="ddim4")
        c.guidance_sweep = (1.25,)
        c.metrics.update(kid_subset_size=100, kid_subsets=10)
    return c
