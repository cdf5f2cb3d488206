"""Sample from a converted Karlo workdir (`python -m unclip_jax.convert karlo`): text -> image.

    pipe = KarloPipeline.from_workdir(WORKDIR)                # Pipeline.from_workdir does this too
    out = pipe.text_to_image(["a red frog on a leaf"], seed=0)   # settings default to PRESET
    out["images"]            # [B, 256, 256, 3] in [-1, 1]; also decoder_images (64px),
                             # image_embedding (the prior's z_i), text_embedding

Karlo's path as diffusers' UnCLIPPipeline runs it: the CLIP text encoder (ViT-L/14) gives the
projected text embedding and the hidden states; the prior samples z_i with x0 clipped to +-5
and guidance against the encoding of "" (not a learned null); the decoder (learned-range
variance) is guided against the learned null z_i plus the "" encoding; the 64px image, clamped,
is resized (antialiased bicubic) and super-resolved with `super_res_first` for all steps but
the last, which uses `super_res_last`. Each stage is one `lax.scan` (ancestral DDPM over
Karlo's step spacing), and the whole path is one jitted program per batch size; with a `mesh`
the batch is split over its devices and the weights are replicated.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import diffusion
from unclip_jax.models.prior import EmbeddingScaling

WORKDIR_FILE = "karlo.json"
# Compiled text -> image programs, shared by every KarloPipeline of the same architecture: the
# program depends on the configs, dtype, settings and batch only (weights and the prior's CLIP
# statistics are arguments), so reloading a workdir does not recompile.
_COMPILED: dict = {}
# Karlo's defaults (diffusers' UnCLIPPipeline.__call__) as `inference.SampleSettings` fields:
# prior 25 steps at guidance 4, decoder 25 at guidance 8, super-resolution 7, all with its
# scheduler's spacing ("karloN"); no best-of-N. (A dict: this module is imported by
# inference.Pipeline.from_workdir, so it does not import inference.)
PRESET = dict(prior_steps="karlo25", prior_guidance=4.0, num_candidates=1,
              decoder_steps="karlo25", decoder_guidance=8.0, upsampler_steps="karlo7")
_USED = ("prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance", "upsampler_steps")


def is_karlo_workdir(workdir: str) -> bool:
    from unclip_jax import paths
    return (paths.path(workdir) / WORKDIR_FILE).exists()


def _restore(path: str):
    """Params as stored (float32 or bfloat16), cast to float32: the modules' compute dtype
    decides the arithmetic."""
    import orbax.checkpoint as ocp
    if not os.path.isdir(path):
        raise FileNotFoundError(f"karlo workdir: {path} is missing")
    params = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


class _Program:
    """The models (no weights) and schedules of one architecture, and its text -> image
    function of (params, tokens, ...): what a compiled program depends on."""

    def __init__(self, cfg: dict, schedulers: dict, dtype):
        from unclip_jax.models import karlo_import as ki

        self.prior = ki.prior_model(cfg["prior"], dtype)
        self.decoder = ki.decoder_model(cfg["decoder"], cfg["text_proj"], dtype)
        self.super_res = ki.upsampler_model(cfg["super_res_first"], "super_res_first", dtype)
        last = ki.upsampler_model(cfg["super_res_last"], "super_res_last", dtype)
        if last.unet != self.super_res.unet:
            raise ValueError("karlo workdir: super_res_first and super_res_last differ in "
                             "architecture; one model definition serves both")
        self.clip = ki.text_encoder_model(cfg["text_encoder"], dtype)
        self.schedulers = schedulers
        self.image_size = int(cfg["decoder"]["sample_size"])
        self.out_size = int(cfg["super_res_first"]["sample_size"])

    # -- pieces --------------------------------------------------------------------------
    def _schedule(self, which: str, steps: str):
        s = self.schedulers[which]
        return diffusion.respace(diffusion.make_schedule(s["schedule"], s["num_timesteps"]),
                                 steps)

    def _sample_kw(self, which: str) -> dict:
        s = self.schedulers[which]
        return dict(method="ddpm", var_type=s["var_type"], parameterization=s["parameterization"],
                    clip_x0=s["clip_x0"])

    def _encode(self, params, tokens):
        from unclip_jax.models.clip import CLIP
        out = self.clip.apply({"params": params}, tokens, method=CLIP.encode_text)
        return out["features"], out["token_encodings"]

    def text_to_image_fn(self, params, tokens, mask, null_tokens, null_mask, rng, s):
        """s: the settings' fields of _USED (a namespace)."""
        b = tokens.shape[0]
        emb, states = self._encode(params["text_encoder"], tokens)
        null_emb, null_states = self._encode(params["text_encoder"], null_tokens)
        r_prior, r_dec, r_sr = jax.random.split(rng, 3)

        def prior_fn(x, t, c):
            return self.prior.apply({"params": params["prior"]}, x, t, c)
        cond = {"z_t": emb, "token_embeddings": states, "token_mask": mask}
        uncond = {"z_t": null_emb, "token_embeddings": null_states, "token_mask": null_mask}
        x = diffusion.sample(prior_fn, self._schedule("prior", s.prior_steps),
                             (b, self.prior.embed_dim), r_prior, cond, uncond=uncond,
                             guidance_scale=s.prior_guidance, **self._sample_kw("prior"))
        z_i = EmbeddingScaling(**params["prior_stats"]).image_inverse(x)

        def dec_fn(x, t, c):
            return self.decoder.apply({"params": params["decoder"]}, x, t, c["z"],
                                      token_mask=c["mask"], text_emb=c["emb"],
                                      text_states=c["states"], drop_image_emb=c["drop"])
        cond = {"z": z_i, "mask": mask, "emb": emb, "states": states,
                "drop": jnp.zeros((b,), bool)}
        uncond = {"z": z_i, "mask": null_mask, "emb": null_emb, "states": null_states,
                  "drop": jnp.ones((b,), bool)}
        size = self.image_size
        low = diffusion.sample(dec_fn, self._schedule("decoder", s.decoder_steps),
                               (b, size, size, 3), r_dec, cond, uncond=uncond,
                               guidance_scale=s.decoder_guidance, **self._sample_kw("decoder"))
        low = jnp.clip(low, -1.0, 1.0)

        sr_sched = self._schedule("super_res", s.upsampler_steps)
        last_t = sr_sched.timestep_map[0]

        def sr_fn(x, t, c):
            def run(p):
                return self.super_res.apply({"params": p}, x, t, c).astype(jnp.float32)
            # The last step (the smallest timestep) is super_res_last's (Karlo's improved SR).
            return jax.lax.cond(t[0] == last_t, lambda: run(params["super_res_last"]),
                                lambda: run(params["super_res_first"]))
        o = self.out_size
        images = diffusion.sample(sr_fn, sr_sched, (b, o, o, 3), r_sr, low,
                                  **self._sample_kw("super_res"))
        return {"images": jnp.clip(images, -1.0, 1.0), "decoder_images": low,
                "image_embedding": z_i, "text_embedding": emb}



class KarloPipeline:
    """The converted Karlo weights, tokenizer and the compiled text -> image path."""

    def __init__(self, workdir: str, dtype=jnp.float32, mesh=None):
        from unclip_jax.data.tokenizer import Tokenizer

        with open(os.path.join(workdir, WORKDIR_FILE)) as f:
            meta = json.load(f)
        self.meta, self.workdir = meta, workdir
        self.program = _Program(meta["configs"], meta["schedulers"], dtype)
        self.params = {n: _restore(os.path.join(workdir, n))
                       for n in ("prior", "decoder", "super_res_first", "super_res_last",
                                 "text_encoder")}
        with np.load(os.path.join(workdir, "prior_stats.npz")) as s:
            self.params["prior_stats"] = {k: jnp.asarray(s[k]) for k in ("image_mean",
                                                                        "image_std")}
        self.tokenizer = Tokenizer.from_hf(os.path.join(workdir, "tokenizer"),
                                           context_length=self.program.prior.text_ctx)
        self._arch = (json.dumps([meta["configs"], meta["schedulers"]], sort_keys=True),
                      jnp.dtype(dtype).name)
        # With a mesh the batch is split over all its devices and the weights replicated (as
        # inference.Pipeline samples).
        self.mesh = mesh
        if mesh is not None:
            self.params = jax.device_put(self.params, NamedSharding(mesh, P()))

    @classmethod
    def from_workdir(cls, workdir: str, *, dtype=jnp.float32, mesh=None,
                     **_) -> "KarloPipeline":
        if not is_karlo_workdir(workdir):
            raise FileNotFoundError(f"{workdir} is not a converted Karlo workdir "
                                    f"({WORKDIR_FILE} missing)")
        return cls(workdir, dtype, mesh)

    def _empty_prompt(self, n: int):
        """The tokens of "" (bos, eos, padding), Karlo's unconditional caption."""
        t = self.tokenizer
        tokens = np.full((n, t.context_length), t.pad_id, np.int32)
        tokens[:, 0], tokens[:, 1] = t.bos_id, t.eos_id
        mask = np.zeros_like(tokens, bool)
        mask[:, :2] = True
        return tokens, mask

    @property
    def upsampler_dirs(self) -> list[str]:
        """The super-resolution stages' directories (as Pipeline.upsampler_dirs)."""
        return [os.path.join(self.workdir, n) for n in ("super_res_first", "super_res_last")]

    def text_to_image(self, prompts, *, seed: int = 0, settings=None) -> dict:
        """Images for the prompts: {"images" (256px), "decoder_images" (64px), "image_embedding",
        "text_embedding"}, numpy arrays with one row per prompt. `settings`: an
        `inference.SampleSettings` (its steps and guidance are used), None for PRESET."""
        for f in ("prior_method", "decoder_method"):
            if getattr(settings, f, "ddpm") != "ddpm":
                raise ValueError(f"karlo: {f}={getattr(settings, f)!r}; Karlo's schedulers are "
                                 "ancestral (ddpm)")
        used = tuple((f, PRESET[f] if settings is None else getattr(settings, f)) for f in _USED)
        tokens, mask = self.tokenizer.encode(list(prompts))
        n = len(tokens)
        if self.mesh is not None:   # pad to a multiple of the devices, repeating the last row
            m = -(-n // self.mesh.devices.size) * self.mesh.devices.size
            tokens, mask = (np.concatenate([a, np.repeat(a[-1:], m - n, 0)]) for a in (tokens,
                                                                                     mask))
        null_tokens, null_mask = self._empty_prompt(len(tokens))
        if self.mesh is not None:
            rows = NamedSharding(self.mesh, P(("data", "fsdp")))
            tokens, mask, null_tokens, null_mask = (jax.device_put(a, rows) for a in (
                tokens, mask, null_tokens, null_mask))
        key = (self._arch, used, len(tokens))
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(functools.partial(self.program.text_to_image_fn,
                                                       s=types.SimpleNamespace(**dict(used))))
        out = _COMPILED[key](self.params, tokens, mask, null_tokens, null_mask,
                             jax.random.PRNGKey(seed))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def preset_settings(settings, keep=frozenset()):
    """A SampleSettings with Karlo's preset in the fields it sets, except those in `keep`."""
    return dataclasses.replace(settings, **{k: v for k, v in PRESET.items() if k not in keep})
