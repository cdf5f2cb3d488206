"""Text -> image with trained stages: CLIP text encoder -> prior -> decoder -> upsamplers.

    pipe = Pipeline.from_workdir("runs/shapes")          # EMA weights of every stage
    out = pipe.text_to_image(["a red circle"], seed=0)   # out["images"]: [B, H, W, 3] in [-1, 1]

The whole path for a batch is one jitted program, compiled once per (batch size, settings) and
reused; with a mesh, the batch is sharded over its devices and the weights replicated. The pieces
(encode_text, encode_images, sample_prior, decode, upsample, invert) are public for the
manipulations in unclip_jax.manipulate.

Workdir layout (what `python -m unclip_jax.main --config=experiments/shapes.py` writes): one
training workdir per stage, `clip/` (with `clip/tokenizer/`), `diffusion_prior/`, `ar_prior/`
(optional), `decoder/`, upsamplers (optional): `upsampler/` and any `upsampler_<suffix>/`,
chained in the order of their numeric suffixes (`upsampler_2/`, `upsampler_3/` or
`upsampler_256/`, `upsampler_1024/` for the paper's 64->256->1024), or as listed in
`from_workdir(upsamplers=[...])`. Each upsampler's low_res_size must be the size the stage before
it makes.
The CLIP stage may instead be a pretrained Hugging Face CLIP: then `clip/` holds `hf_clip.json`
naming its folder (models/clip_import.py; what experiments/webdata.py writes), and the prompts
are tokenised with that folder's tokenizer.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import diffusion, parallel, paths
from unclip_jax.settings import SampleSettings  # noqa: F401  (re-exported: the API's name)
from unclip_jax.stages import UNCLIP_STAGES
from unclip_jax.train.checkpoint import Trained, load_trained


def slerp(a, b, theta):
    """Spherical interpolation between a and b ([..., D]) at theta in [0, 1], on their norms'
    linear interpolation (CLIP embeddings are unit vectors, so norm 1 in practice)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    theta = jnp.asarray(theta, jnp.float32)[..., None] if jnp.ndim(theta) else theta
    na, nb = jnp.linalg.norm(a, axis=-1, keepdims=True), jnp.linalg.norm(b, axis=-1, keepdims=True)
    ua, ub = a / na, b / nb
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, -1, keepdims=True), -1.0, 1.0))
    so = jnp.sin(omega)
    # Nearly parallel vectors: the slerp weights tend to the linear ones.
    wa = jnp.where(so > 1e-6, jnp.sin((1.0 - theta) * omega) / jnp.where(so > 1e-6, so, 1.0),
                   1.0 - theta)
    wb = jnp.where(so > 1e-6, jnp.sin(theta * omega) / jnp.where(so > 1e-6, so, 1.0), theta)
    return (wa * ua + wb * ub) * ((1.0 - theta) * na + theta * nb)


def is_clip_stage(stage_dir: str) -> bool:
    """A CLIP stage directory: trained here (checkpoints/) or importing a HF CLIP."""
    from unclip_jax.models.clip_import import LINK_FILE
    d = paths.path(stage_dir)
    return (d / "checkpoints").is_dir() or (d / LINK_FILE).is_file()


def load_clip(stage_dir: str, *, ema: bool = True) -> Trained:
    """The CLIP stage in `stage_dir`: trained here, or an imported HF CLIP (hf_clip.json)."""
    from unclip_jax.models.clip_import import LINK_FILE, load_clip_stage
    if (paths.path(stage_dir) / LINK_FILE).is_file():
        return load_clip_stage(stage_dir)
    return load_trained(stage_dir, ema=ema)


def _tokenizer_for(clip: Trained):
    from unclip_jax.data.tokenizer import Tokenizer
    path = str(clip.config.tokenizer.dir)
    if not paths.path(path).is_dir():
        raise FileNotFoundError(f"the CLIP stage's tokenizer directory {path} is missing")
    return Tokenizer.load(path, context_length=int(clip.config.model.text_ctx))


def clip_text_fn(clip: Trained):
    """(params, tokens) -> CLIP text outputs (embedding = z_t, token_encodings)."""
    from unclip_jax.models.clip import CLIP

    def f(params, tokens):
        return clip.model.apply({"params": params}, tokens, method=CLIP.encode_text)
    return f


def clip_image_fn(clip: Trained):
    """(params, images in [-1, 1], any size) -> CLIP image outputs (embedding = z_i)."""
    from unclip_jax.models.clip import CLIP
    size = int(clip.config.model.image_size)
    method = clip.config.model.get("resize", "linear")   # imported CLIPs: bicubic, as HF's

    def f(params, images):
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), method)
        return clip.model.apply({"params": params}, images, method=CLIP.encode_image)
    return f


def find_upsamplers(workdir: str) -> list[str]:
    """The trained upsampler directories under `workdir` in chain order: `upsampler`, then
    `upsampler_<suffix>` by numeric suffix (then by name)."""
    names = [d.name for d in sorted(paths.path(workdir).iterdir()) if (
        d.name == "upsampler" or d.name.startswith("upsampler_")) and (d / "checkpoints").is_dir()]

    def order(d):
        suffix = d[len("upsampler_"):] if d != "upsampler" else ""
        return (0 if not suffix else 1, int(suffix) if suffix.isdigit() else float("inf"), d)
    return [os.path.join(workdir, d) for d in sorted(names, key=order)]


def _check_chain(decoder: Trained, upsamplers) -> None:
    size = int(decoder.config.model.image_size)
    for u in upsamplers:
        low = int(u.config.model.low_res_size)
        if low != size:
            raise ValueError(f"upsampler {u.workdir} takes {low}x{low} images but the stage "
                             f"before it makes {size}x{size}: chain the upsamplers in order "
                             "(Pipeline.from_workdir(upsamplers=[...]), sample --upsamplers=...)")
        size = int(u.config.model.image_size)


class Pipeline:
    """Trained unCLIP stages and the compiled text -> image path between them."""

    def __init__(self, clip: Trained, decoder: Trained, prior: Trained | None = None,
                 ar_prior: Trained | None = None, upsamplers=(), mesh=None):
        if prior is None and ar_prior is None:
            raise ValueError("a pipeline needs a diffusion prior or an AR prior")
        self.clip, self.decoder, self.prior, self.ar_prior = clip, decoder, prior, ar_prior
        self.upsamplers = tuple(upsamplers)
        _check_chain(decoder, self.upsamplers)
        self.tokenizer = _tokenizer_for(clip)
        self.mesh = mesh
        self._compiled: dict = {}
        self._encode_text_fn, self._encode_image_fn = clip_text_fn(clip), clip_image_fn(clip)
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            for t in self._trained():
                t.params = jax.device_put(t.params, rep)

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: str, *, ema: bool = True, mesh=None,
                     upsamplers=None) -> "Pipeline":
        """Load every stage found under `workdir` (see module docstring). `upsamplers`: the
        upsampler stage directories to chain, in order (names under `workdir` or paths; [] for
        none); None: every upsampler found."""
        if not paths.path(workdir).is_dir():
            raise FileNotFoundError(f"workdir {workdir} does not exist")
        from unclip_jax import karlo
        if karlo.is_karlo_workdir(workdir):   # converted released weights, their own sampler
            return karlo.KarloPipeline.from_workdir(workdir, mesh=mesh)
        found = {d: os.path.join(workdir, d) for d in UNCLIP_STAGES
                 if (paths.path(workdir) / d / "checkpoints").is_dir()}
        if "clip" not in found and is_clip_stage(os.path.join(workdir, "clip")):
            found["clip"] = os.path.join(workdir, "clip")
        for need in ("clip", "decoder"):
            if need not in found:
                raise FileNotFoundError(f"{workdir} has no trained '{need}' stage ({need}/checkpoints "
                                        + ("or clip/hf_clip.json " if need == "clip" else "")
                                        + f"missing); stages found: {sorted(found) or 'none'}")
        if "diffusion_prior" not in found and "ar_prior" not in found:
            raise FileNotFoundError(f"{workdir} has no trained prior (diffusion_prior/ or ar_prior/)")
        if upsamplers is None:
            ups = find_upsamplers(workdir)
        else:
            ups = [u if paths.is_url(u) else os.path.join(workdir, u)  # an absolute u too
                   for u in upsamplers]
            for u in ups:
                if not (paths.path(u) / "checkpoints").is_dir():
                    raise FileNotFoundError(f"upsampler {u} has no checkpoints/ (not a trained "
                                            f"stage); found: {find_upsamplers(workdir) or 'none'}")
        return cls.from_stage_dirs(clip=found["clip"], decoder=found["decoder"],
                                   prior=found.get("diffusion_prior"),
                                   ar_prior=found.get("ar_prior"), upsamplers=ups, ema=ema,
                                   mesh=mesh)

    @classmethod
    def from_stage_dirs(cls, *, clip: str, decoder: str, prior: str | None = None,
                        ar_prior: str | None = None, upsamplers=(), ema: bool = True,
                        mesh=None) -> "Pipeline":
        load = functools.partial(load_trained, ema=ema)
        return cls(load_clip(clip, ema=ema), load(decoder), load(prior) if prior else None,
                   load(ar_prior) if ar_prior else None, [load(u) for u in upsamplers], mesh)

    def _trained(self):
        return [t for t in (self.clip, self.prior, self.ar_prior, self.decoder, *self.upsamplers)
                if t is not None]

    # -- text and images --------------------------------------------------------------------
    def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not len(prompts):
            raise ValueError("no prompts given")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens, mask = self.tokenizer.encode(list(prompts))
        for w in caught:  # surface truncation once, naming the context length
            warnings.warn(f"{w.message}", stacklevel=2)
        return tokens, mask

    def encode_text(self, prompts) -> dict:
        """CLIP text features: tokens, token_mask, text_embedding (z_t), token_encodings."""
        tokens, mask = self.tokenize(prompts)
        out = self._jit("text", lambda: jax.jit(self._encode_text_fn))(self.clip.params,
                                                                        jnp.asarray(tokens))
        return {"tokens": tokens, "token_mask": mask, "text_embedding": np.asarray(out["embedding"]),
                "token_encodings": np.asarray(out["token_encodings"])}

    def encode_images(self, images) -> np.ndarray:
        """CLIP image embeddings (z_i) of images [B, H, W, 3] in [-1, 1]."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        out = self._jit("image", lambda: jax.jit(self._encode_image_fn))(self.clip.params, images)
        return np.asarray(out["embedding"])

    # -- stage samplers (pure; composed inside one jit below) --------------------------------
    def _prior_fn(self, params, text, rng, s: SampleSettings):
        from unclip_jax.models.prior import sample_prior
        from unclip_jax.stages.diffusion_prior import scaling_from_config, schedule_from_config
        cfg = self.prior.config
        batch = {"text_embedding": text["embedding"], "token_mask": text["mask"]}
        if int(cfg.model.vocab_size) > 0:
            batch["tokens"] = text["tokens"]
        else:
            batch["token_embeddings"] = text["token_encodings"]
        schedule = schedule_from_config(cfg)
        var_type, stat = self._prior_variance(s)
        eps_sq_norm, x0_range = None, None
        if stat is not None:  # per training timestep -> the respaced steps'
            eps_sq_norm = stat[0][np.asarray(diffusion.respace(
                schedule, s.prior_steps).timestep_map)]
            x0_range = stat[1]
        return sample_prior(self.prior.model, params, batch, rng,
                            schedule=schedule, scaling=scaling_from_config(cfg),
                            steps=s.prior_steps, guidance_scale=s.prior_guidance,
                            num_candidates=s.num_candidates, method=s.prior_method,
                            var_type=var_type, eps_sq_norm=eps_sq_norm, x0_range=x0_range)

    def _prior_variance(self, s: SampleSettings):
        """(var_type, None or (eps_sq_norm per training timestep, x0_range)) of the diffusion
        prior."""
        from unclip_jax.stages import prior_variance
        v = s.prior_var_type
        if v == "config":
            v = prior_variance.configured_var_type(self.prior.config)
        if v != "analytic" or s.prior_method != "ddpm":
            return v, None
        return v, prior_variance.eps_sq_norm_for(self.prior)

    def _ar_prior_fn(self, params, text, rng, s: SampleSettings):
        from unclip_jax.models.ar_prior import sample_ar_prior
        from unclip_jax.stages.ar_prior import get_codec, text_scale
        cfg = self.ar_prior.config
        batch = {"text_embedding": text["embedding"], "token_mask": text["mask"]}
        if int(cfg.model.vocab_size) > 0:
            batch["tokens"] = text["tokens"]
        else:
            batch["token_embeddings"] = text["token_encodings"]
        toks = sample_ar_prior(self.ar_prior.model, params, batch, rng,
                               temperature=s.ar_temperature, top_k=s.ar_top_k, dot_top_half=True,
                               guidance_scale=s.ar_guidance, text_scale=text_scale(cfg),
                               kv_cache=s.ar_kv_cache)
        codec = get_codec(cfg)
        # Decode on device: bucket centres of the PCA coordinates, then inverse PCA.
        centres = jnp.asarray(codec.quantizer.centres, jnp.float32)          # [k, buckets]
        pcs = toks[:, 1:]
        vals = centres[jnp.arange(codec.k)[None, :], pcs]
        comps = jnp.asarray(codec.pca.components[:codec.k], jnp.float32)
        return vals @ comps + jnp.asarray(codec.pca.mean, jnp.float32)

    def _decoder_tokens(self, tokens):
        m = self.decoder.config.model
        if not int(m.text_depth):
            return None, None
        from unclip_jax.stages.decoder import decoder_tokens
        return decoder_tokens(self.decoder.config, tokens, jnp)   # the mask it trained with

    def _decoder_model_fn(self, params):
        def model_fn(x, t, c):
            return self.decoder.model.apply({"params": params}, x, t, c["image_emb"],
                                            c.get("tokens"), c.get("token_mask"),
                                            drop_image_emb=c["drop_image"], drop_text=c["drop_text"])
        return model_fn

    def _decoder_cond(self, z_i, tokens, use_text: bool):
        m = self.decoder.config.model
        b = z_i.shape[0]
        cond = {"image_emb": z_i * float(m.image_emb_scale),
                "drop_image": jnp.zeros((b,), bool),
                "drop_text": jnp.full((b,), not use_text)}
        if tokens is not None:
            cond["tokens"], cond["token_mask"] = self._decoder_tokens(tokens)
        uncond = dict(cond, drop_image=jnp.ones((b,), bool), drop_text=jnp.ones((b,), bool))
        return cond, uncond

    def _decoder_schedule(self, steps: str):
        from unclip_jax.stages.decoder import schedule_for
        d = self.decoder.config.diffusion
        return diffusion.respace(schedule_for(d["schedule"], d["num_timesteps"]), steps), d

    def _decode_fn(self, params, z_i, tokens, rng, x_T, s: SampleSettings, use_text: bool = True):
        m = self.decoder.config.model
        sched, d = self._decoder_schedule(s.decoder_steps)
        cond, uncond = self._decoder_cond(z_i, tokens, use_text and tokens is not None)
        learned = bool(m.learn_sigma)
        size = int(m.image_size)
        shape = (z_i.shape[0], size, size, 3)
        return diffusion.sample(
            self._decoder_model_fn(params), sched, shape, rng, cond,
            uncond=uncond if s.decoder_guidance != 1.0 else None,
            guidance_scale=s.decoder_guidance, method=s.decoder_method, eta=s.decoder_eta,
            parameterization=d["parameterization"],
            var_type="learned_range" if learned else "fixed_small", learned_sigma=learned,
            clip_x0=1.0 if s.decoder_clip else None, x_T=x_T)

    def _invert_fn(self, params, images, z_i, tokens, s: SampleSettings, use_text: bool):
        m = self.decoder.config.model
        sched, d = self._decoder_schedule(s.decoder_steps)
        cond, uncond = self._decoder_cond(z_i, tokens, use_text and tokens is not None)
        return diffusion.ddim_invert(
            self._decoder_model_fn(params), sched, images, cond,
            uncond=uncond if s.decoder_guidance != 1.0 else None,
            guidance_scale=s.decoder_guidance, parameterization=d["parameterization"],
            learned_sigma=bool(m.learn_sigma))

    def _upsampler_steps(self, s: SampleSettings) -> tuple:
        steps = s.upsampler_steps
        if isinstance(steps, str):
            return (steps,) * len(self.upsamplers)
        if len(steps) != len(self.upsamplers):
            raise ValueError(f"settings.upsampler_steps gives {len(steps)} respacings "
                             f"({', '.join(steps)}) for {len(self.upsamplers)} upsamplers "
                             f"({', '.join(u.workdir for u in self.upsamplers) or 'none'})")
        return tuple(steps)

    def _upsample_fn(self, params_list, images, rng, s: SampleSettings):
        from unclip_jax.stages.decoder import schedule_for
        for i, (up, params, steps) in enumerate(zip(self.upsamplers, params_list,
                                                    self._upsampler_steps(s))):
            d = up.config.diffusion
            sched = diffusion.respace(schedule_for(d["schedule"], d["num_timesteps"]), steps)
            size = int(up.config.model.image_size)
            low = jax.image.resize(images, (images.shape[0], size, size, 3), "linear")

            def model_fn(x, t, c, up=up, params=params):
                return up.model.apply({"params": params}, x, t, c["low_res"])

            images = diffusion.sample(model_fn, sched, low.shape, jax.random.fold_in(rng, i),
                                      {"low_res": low}, method="ddim", eta=s.upsampler_eta,
                                      parameterization=d["parameterization"], clip_x0=1.0)
        return images

    def _jit(self, key, make):
        if key not in self._compiled:
            self._compiled[key] = make()
        return self._compiled[key]

    # -- public sampling ------------------------------------------------------------------------
    def _params(self):
        return {"clip": self.clip.params,
                "prior": self.prior.params if self.prior else None,
                "ar_prior": self.ar_prior.params if self.ar_prior else None,
                "decoder": self.decoder.params,
                "upsamplers": [u.params for u in self.upsamplers]}

    def _check_prior(self, s: SampleSettings):
        if s.prior == "diffusion" and self.prior is None:
            raise ValueError("settings.prior='diffusion' but no diffusion prior is loaded")
        if s.prior == "diffusion":
            self._prior_variance(s)  # a missing Analytic-DPM statistic: before any compile
        if s.prior == "ar" and self.ar_prior is None:
            raise ValueError("settings.prior='ar' but no AR prior is loaded")

    def _text_to_image_fn(self, params, tokens, mask, rng, s: SampleSettings):
        text = self._encode_text_fn(params["clip"], tokens)
        text = {"embedding": text["embedding"], "token_encodings": text["token_encodings"],
                "tokens": tokens, "mask": mask}
        r_prior, r_dec, r_up = jax.random.split(rng, 3)
        if s.prior == "diffusion":
            z_i = self._prior_fn(params["prior"], text, r_prior, s)
        else:
            z_i = self._ar_prior_fn(params["ar_prior"], text, r_prior, s)
        low = self._decode_fn(params["decoder"], z_i, tokens, r_dec, None, s)
        images = self._upsample_fn(params["upsamplers"], low, r_up, s)
        return {"images": images, "decoder_images": low, "image_embedding": z_i,
                "text_embedding": text["embedding"]}

    @property
    def upsampler_dirs(self) -> list[str]:
        """The chained upsamplers' stage directories, in order (what `sample` records)."""
        return [u.workdir for u in self.upsamplers]

    def text_to_image(self, prompts, *, seed: int = 0,
                      settings: SampleSettings = SampleSettings()) -> dict:
        """Images for the prompts: {"images" (last stage), "decoder_images", "image_embedding",
        "text_embedding"}, numpy arrays with one row per prompt."""
        self._check_prior(settings)
        tokens, mask = self.tokenize(prompts)
        n = len(tokens)
        # Rows padded to a multiple of the mesh's devices; the first n are the prompts'.
        tokens, mask = parallel.shard_rows(self.mesh, tokens, mask)
        fn = self._jit(("t2i", settings, len(tokens)), lambda: jax.jit(
            functools.partial(self._text_to_image_fn, s=settings)))
        out = fn(self._params(), tokens, mask, jax.random.PRNGKey(seed))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def sample_prior(self, prompts, *, seed: int = 0,
                     settings: SampleSettings = SampleSettings()) -> np.ndarray:
        """z_i for the prompts from the chosen prior."""
        self._check_prior(settings)
        tokens, mask = self.tokenize(prompts)

        def f(params, tokens, mask, rng):
            t = self._encode_text_fn(params["clip"], tokens)
            text = {"embedding": t["embedding"], "token_encodings": t["token_encodings"],
                    "tokens": tokens, "mask": mask}
            if settings.prior == "diffusion":
                return self._prior_fn(params["prior"], text, rng, settings)
            return self._ar_prior_fn(params["ar_prior"], text, rng, settings)

        fn = self._jit(("prior", settings, len(tokens)), lambda: jax.jit(f))
        return np.asarray(fn(self._params(), jnp.asarray(tokens), jnp.asarray(mask),
                             jax.random.PRNGKey(seed)))

    def decode(self, image_embedding, *, prompts=None, seed: int = 0, x_T=None,
               settings: SampleSettings = SampleSettings()) -> np.ndarray:
        """Decoder images for z_i (and optional captions; without them the caption is the
        learned null, as for image variations). x_T fixes the starting noise."""
        z = jnp.asarray(image_embedding, jnp.float32)
        tokens = None if prompts is None else jnp.asarray(self.tokenize(prompts)[0])
        key = ("decode", settings, z.shape, tokens is None, x_T is None)
        fn = self._jit(key, lambda: jax.jit(functools.partial(self._decode_fn, s=settings)))
        return np.asarray(fn(self.decoder.params, z, tokens, jax.random.PRNGKey(seed),
                             None if x_T is None else jnp.asarray(x_T, jnp.float32)))

    def invert(self, images, image_embedding, *, prompts=None,
               settings: SampleSettings = SampleSettings()) -> np.ndarray:
        """DDIM inversion with the decoder: images (at the decoder's size) -> x_T."""
        images = jnp.asarray(images, jnp.float32)
        size = int(self.decoder.config.model.image_size)
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), "linear")
        z = jnp.asarray(image_embedding, jnp.float32)
        tokens = None if prompts is None else jnp.asarray(self.tokenize(prompts)[0])
        key = ("invert", settings, images.shape, tokens is None)
        fn = self._jit(key, lambda: jax.jit(functools.partial(
            self._invert_fn, s=settings, use_text=tokens is not None)))
        return np.asarray(fn(self.decoder.params, images, z, tokens))

    def upsample(self, images, *, seed: int = 0,
                 settings: SampleSettings = SampleSettings()) -> np.ndarray:
        if not self.upsamplers:
            return np.asarray(images)
        images = jnp.asarray(images, jnp.float32)
        fn = self._jit(("up", settings, images.shape), lambda: jax.jit(
            functools.partial(self._upsample_fn, s=settings)))
        return np.asarray(fn([u.params for u in self.upsamplers], images, jax.random.PRNGKey(seed)))


def default_mesh():
    """All local devices on the data axis (sampling is data-parallel)."""
    return parallel.make_mesh({"data": -1})


class ClipEncoder:
    """`unclip_jax.embed` encoder backed by a run's CLIP stage (config.embed.clip_workdir):
    trained here or imported (`load_clip`)."""

    def __init__(self, workdir: str):
        self.clip = load_clip(workdir)
        self.tokenizer = _tokenizer_for(self.clip)
        self._text, self._image = jax.jit(clip_text_fn(self.clip)), jax.jit(clip_image_fn(self.clip))

    def encode_images(self, images):
        return np.asarray(self._image(self.clip.params, jnp.asarray(images))["embedding"])

    def encode_texts(self, captions):
        tokens, _ = self.tokenizer.encode(list(captions))
        out = self._text(self.clip.params, jnp.asarray(tokens))
        return {"text_embedding": np.asarray(out["embedding"]), "tokens": tokens,
                "token_embeddings": np.asarray(out["token_encodings"])}


def clip_encoder(config):
    """Factory for `unclip_jax.embed` (embed.encoder = "unclip_jax.inference:clip_encoder")."""
    return ClipEncoder(str(config.embed.clip_workdir))
