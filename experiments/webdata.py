"""The whole unCLIP stack on real captioned images with a pretrained CLIP: the counterpart of
experiments/shapes.py for web data (recipe unclip_jax/recipes/webdata.py).

Run on one GPU host (sizes below; one process drives every local GPU):
  python -m unclip_jax.main --config=experiments/webdata.py --workdir=runs/webdata \
      --config.clip_import.hf_dir=/models/clip-vit-large-patch14 \
      --config.data.path='/data/cc3m/{split}/*.tar' \
      [--config.evaluate.inception_weights=/weights/pt_inception-2015-12-05.npz]
On a TPU VM or pod slice: the same command on every host (`jax.distributed` finds the others);
raise the widths and batches to the chips, e.g. for a v5e-64 / v4-64:
  --config.stages.decoder.model.base_channels=320 --config.stages.decoder.train.batch_size=1024
  --config.stages.diffusion_prior.model.width=1024 --config.stages.diffusion_prior.model.depth=20
  --config.stages.diffusion_prior.train.batch_size=2048 --config.stages.upsampler.train.batch_size=512
  (and --config.stages.<s>.mesh.fsdp=N, mesh.data=-1, once a stage no longer fits a chip
  replicated).
Smoke: --config=experiments/webdata.py:smoke needs no input: it writes a few webdataset shards
  and a tiny random-weight HF CLIP under <workdir>/inputs (in the bucket for a gs:// workdir),
  then runs every step (one training step per stage), samples and evaluates: a few minutes on
  CPU.
The workdir, data.path and clip_import.hf_dir may each be local or gs://... (the HF folder is
read through a local copy on each host).

Inputs (nothing is downloaded):
  clip_import.hf_dir  a Hugging Face CLIP folder (config.json, model.safetensors, vocab.json,
                      merges.txt, tokenizer configs), e.g. `openai/clip-vit-large-patch14`
                      (the sizes here are for its 768-d embeddings) saved with save_pretrained;
                      any HF CLIP works: the stages' embedding width (projection_dim), caption
                      length (77 tokens), token encoding width, caption vocabulary and pad id
                      follow the folder (recipes/webdata.py adapt_stage).
  data                img2dataset webdataset shards (data.path a glob with "{split}": splits
                      "train" and, for the evaluation, "test"); the `:folder` variant reads a
                      folder with captions.jsonl per split (data.path), `:tfds` a tfds dataset
                      (data.tfds_name, data.caption_key; unclip_jax/data/config.py).
Steps (one sub-workdir each, resumable; finished ones are skipped on re-runs):
  clip             clip/hf_clip.json links the HF folder: the run's CLIP (nothing trained)
  embed            CLIP image/text embeddings and token encodings of every example (embed/)
  diffusion_prior  decoder-only transformer over [token encodings, z_t, t, noised z_i, query]
  ar_prior         PCA (256 of 768 dims), 1024 equal-mass buckets, encoder-decoder transformer
  decoder          64x64 ADM U-Net on z_i + the caption tokens, eps + learned sigma (paper)
  upsampler        64 -> 256 convolution-only U-Net on 64x64 random crops (paper)
  samples          samples/grid.png for `sample.prompts`
  evaluate         eval/webdata/eval.json on the first `evaluate.protocol.num_samples` examples
                   of the held-out split: CLIP score with the run's CLIP (and of the real images),
                   the priors' cosine to the true z_i against z_t, CLIP-space FD,
                   precision/recall; FID and KID against the held-out images when
                   evaluate.inception_weights names the FID Inception weights file.
Widths are for one 80 GB GPU; the paper's are several times larger (experiments/paper/).
"""
import ml_collections

from experiments import ar_prior_shapes, decoder_shapes, prior_shapes, upsampler_shapes
from unclip_jax.data import default_data_config
from unclip_jax.embed import embed_config
from unclip_jax.eval.config import eval_config


def get_config(arg=None):
    if arg not in (None, "", "smoke", "folder", "tfds"):
        raise ValueError(f"experiments/webdata.py: unknown variant {arg!r} (use :folder, :tfds "
                         "or :smoke)")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.pipeline = "unclip"       # marks a whole-stack config for unclip_jax.main
    c.recipe = "webdata"        # unclip_jax/recipes/webdata.py
    c.seed = 0
    c.order = ("clip", "embed", "diffusion_prior", "ar_prior", "decoder", "upsampler",
               "samples", "evaluate")
    c.clip_import = ml_collections.ConfigDict(dict(hf_dir=""))
    c.data = default_data_config(arg if arg in ("folder", "tfds") else "webdataset")
    if arg == "tfds":
        c.data.tfds_name = ""   # e.g. "coco_captions" (prepared as array_record)
    else:
        c.data.path = ""        # e.g. "/data/cc3m/{split}/*.tar" or "/data/imgs/{split}"
    c.data.num_threads = 16
    # :smoke makes its inputs under <workdir>/inputs (shards, random HF CLIP) with these sizes.
    c.make_inputs = smoke
    c.make_inputs_sizes = ml_collections.ConfigDict(dict(
        num_train=32, num_test=8, shard_size=8, image_size=32,
        clip=dict(text_width=32, text_depth=1, text_heads=2, vision_width=24, vision_depth=1,
                  vision_heads=2, image_size=32, patch=8, projection_dim=16,
                  init_std=0.2)))   # weights large enough for image-dependent embeddings

    # Sizes that follow the CLIP (embed_dim, text_ctx, text_dim, clip_dim, text_vocab,
    # text_pad_id, image_emb_scale, prior scale) are set by the recipe from the HF folder.
    s = ml_collections.ConfigDict()
    s.diffusion_prior = prior_shapes.get_config()
    s.diffusion_prior.model.update(width=768, depth=12, heads=12, dropout=0.0)
    s.diffusion_prior.train.update(batch_size=512, num_steps=200_000, log_every=100,
                                   ckpt_every=5000)
    s.diffusion_prior.optim.update(lr=1.1e-4, warmup_steps=2000)

    s.ar_prior = ar_prior_shapes.get_config()
    s.ar_prior.model.update(pca_components=256, num_buckets=1024, enc_width=512, enc_depth=4,
                            enc_heads=8, dec_width=768, dec_depth=12, dec_heads=12)
    s.ar_prior.train.update(batch_size=512, num_steps=200_000, log_every=100, ckpt_every=5000)
    s.ar_prior.optim.update(lr=1.6e-4, warmup_steps=2000)

    s.decoder = decoder_shapes.get_config()
    s.decoder.model.update(image_size=64, base_channels=192, channel_mult=(1, 2, 3, 4),
                           num_res_blocks=3, attention_resolutions=(32, 16, 8),
                           head_channels=64, norm_groups=32, dropout=0.1, clip_tokens=4,
                           text_width=512, text_depth=8, text_heads=8)
    s.decoder.train.update(batch_size=128, num_steps=300_000, log_every=100, ckpt_every=5000)
    s.decoder.optim.update(lr=1.2e-4, warmup_steps=2000, ema_decay=0.9999)

    s.upsampler = upsampler_shapes.get_config()
    s.upsampler.model.update(image_size=256, low_res_size=64, base_channels=128,
                             channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, norm_groups=32)
    s.upsampler.diffusion.crop_fraction = 0.25   # the paper's 64x64 crops of 256x256
    s.upsampler.train.update(batch_size=64, num_steps=200_000, log_every=100, ckpt_every=5000)
    s.upsampler.optim.update(lr=1.2e-4, warmup_steps=2000, ema_decay=0.9999)
    c.stages = s

    c.embed = embed_config(batch_size=256)
    c.sample = ml_collections.ConfigDict(dict(
        prompts=("a photo of a dog on the beach", "a red car parked in the street",
                 "a bowl of fruit on a wooden table", "a mountain lake at sunset"),
        per_prompt=4, seed=0,
        settings=dict(prior="diffusion", prior_steps="64", num_candidates=2,
                      prior_guidance=1.0, decoder_steps="250", decoder_method="ddpm",
                      decoder_guidance=3.0, upsampler_steps="ddim27")))
    # unclip_jax.evaluate's config; data (None: config.data) and sampling settings (unset
    # ones: sample.settings) are filled in by the recipe.
    c.evaluate = eval_config(name="webdata")
    c.evaluate.protocol.update(num_samples=2000, split="test")
    c.evaluate.sampling.batch_size = 64
    c.evaluate.metrics.shapes_accuracy = "false"

    if smoke:
        c.data.num_threads = 2
        for st in s.values():
            st.train.update(num_steps=1, log_every=1, ckpt_every=1, batch_size=8,
                            init_prng="rbg")  # its init programs compile ~3x faster
            # One device: a one-step run gains nothing from a mesh, and saving replicated
            # params from many (fake CPU) devices costs Orbax a slice per replica.
            st.mesh.num_devices = 1
        s.diffusion_prior.model.update(width=32, depth=1, heads=2)
        s.ar_prior.model.update(pca_components=8, num_buckets=16, enc_width=32, enc_depth=1,
                                enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
        s.decoder.model.update(image_size=16, base_channels=16, channel_mult=(1, 2),
                               num_res_blocks=1, attention_resolutions=(8,), head_channels=16,
                               norm_groups=8, dropout=0.0, text_width=32, text_depth=1,
                               text_heads=2)
        s.upsampler.model.update(image_size=32, low_res_size=16, base_channels=16,
                                 channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
        s.upsampler.diffusion.crop_fraction = 0.5
        c.embed.batch_size = 16
        c.sample.update(prompts=("a red circle", "a blue square"), per_prompt=2)
        c.sample.settings.update(prior_steps="2", decoder_steps="2", upsampler_steps="ddim2")
        c.evaluate.protocol.num_samples = 4
        c.evaluate.sampling.batch_size = 4
        # One device, as the samples step: 4 captions gain nothing from a mesh, and the
        # text -> image program is then the samples step's (one compile, not two).
        c.evaluate.num_devices = 1
        c.evaluate.update(save_images=True, grid_images=4)
    return c
