"""Karlo text -> image: ours (converted workdir) against diffusers' UnCLIPPipeline, same weights.

  python -m benchmarks.karlo --size=tiny|small|full [--batch=1] [--rounds=3] [--json=out.json]
  python -m benchmarks.karlo --mode=steps --size=full [--models=prior,decoder,super_res] ...

Builds a randomly initialised diffusers UnCLIPPipeline (Karlo's block types; `full` is
kakaobrain/karlo-v1-alpha's architecture, ~3.3B parameters, `small` the same layout at about a
fifth of the widths, `tiny` the test suite's), saves it, converts it with `unclip_jax.convert`
and times the whole text -> 256px (tiny: 16px) path with Karlo's preset (prior 25 steps at
guidance 4, decoder 25 at 8, super-res 7) on both sides in float32, in interleaved rounds.
Our compile time (the first call) is reported apart from the timed rounds. Needs torch and
diffusers (the test extra); not used by the package.

`--mode=steps` times one denoising call of each model instead (one at a time, so only one
model's weights are in memory on each side): the prior and the decoder (with its text
projection) on the guided batch (2 x --batch rows, as classifier-free guidance runs them), the
super-resolution U-Net (with its bicubic resize of the 64px image) on --batch rows; the same
random weights on both sides (converted in memory), the outputs compared as a check.
"""
from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time

from absl import app, flags

_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "small", "full"], "Architecture.")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timed rounds (median reported).")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default).")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
_MODE = flags.DEFINE_enum("mode", "text_to_image", ["text_to_image", "steps"],
                          "The whole text -> image path, or one denoising call per model.")
_MODELS = flags.DEFINE_list("models", ["prior", "decoder", "super_res"], "--mode=steps: which.")

DOWN = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D")
UP = ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
      "ResnetUpsampleBlock2D")


def configs(size: str) -> dict:
    """diffusers constructor arguments per component (`full`: diffusers' conversion script)."""
    if size == "tiny":
        unet = dict(layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8)
        return dict(
            text=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=8, projection_dim=16),
            prior=dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                       embedding_dim=16, num_embeddings=8, additional_embeddings=4),
            text_proj=dict(clip_extra_context_tokens=2, clip_embeddings_dim=16,
                           time_embed_dim=64, cross_attention_dim=24),
            decoder=dict(sample_size=8, cross_attention_dim=24, attention_head_dim=8,
                         down_block_types=(DOWN[0], DOWN[1]), up_block_types=(UP[2], UP[3]),
                         **unet),
            super_res=dict(sample_size=16, down_block_types=(DOWN[0],) * 2,
                           up_block_types=(UP[3],) * 2, **unet))
    w = 64 if size == "small" else 320
    width, emb = (256, 128) if size == "small" else (2048, 768)
    return dict(
        text=dict(hidden_size=emb, intermediate_size=4 * emb,
                  num_hidden_layers=2 if size == "small" else 12,
                  num_attention_heads=emb // 64, max_position_embeddings=77,
                  projection_dim=emb),
        prior=dict(num_attention_heads=width // 64, attention_head_dim=64,
                   num_layers=4 if size == "small" else 20, embedding_dim=emb,
                   num_embeddings=77, additional_embeddings=4),
        text_proj=dict(clip_extra_context_tokens=4, clip_embeddings_dim=emb,
                       time_embed_dim=4 * w, cross_attention_dim=w * 24 // 5),
        decoder=dict(sample_size=64, cross_attention_dim=w * 24 // 5, attention_head_dim=64,
                     layers_per_block=3, block_out_channels=(w, 2 * w, 3 * w, 4 * w),
                     down_block_types=DOWN, up_block_types=UP),
        super_res=dict(sample_size=256, layers_per_block=3,
                       block_out_channels=(w, 2 * w, 3 * w, 4 * w),
                       down_block_types=(DOWN[0],) * 4, up_block_types=(UP[3],) * 4))


def build(size: str, directory: str):
    """A random diffusers UnCLIPPipeline of `size`, saved under directory/src."""
    import os

    import diffusers
    import torch
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from tokenizers.pre_tokenizers import ByteLevel

    c = configs(size)
    # A byte-level CLIP vocabulary written here (nothing downloads); ids stay below its size.
    tok_dir = os.path.join(directory, "tok")
    os.makedirs(tok_dir)
    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [ch + "</w>" for ch in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = transformers.CLIPTokenizer.from_pretrained(
        tok_dir, model_max_length=c["text"]["max_position_embeddings"])
    torch.manual_seed(0)
    text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **c["text"]))
    prior = diffusers.PriorTransformer(**c["prior"])
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    sched = lambda **kw: diffusers.UnCLIPScheduler(num_train_timesteps=1000, **kw)  # noqa: E731
    sr = dict(in_channels=6, out_channels=3, add_attention=False, **c["super_res"])
    pipe = diffusers.UnCLIPPipeline(
        prior=prior, text_proj=UnCLIPTextProjModel(**c["text_proj"]),
        decoder=diffusers.UNet2DConditionModel(
            in_channels=3, out_channels=6, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            resnet_time_scale_shift="scale_shift", class_embed_type="identity",
            **c["decoder"]),
        text_encoder=text, tokenizer=tok, super_res_first=diffusers.UNet2DModel(**sr),
        super_res_last=diffusers.UNet2DModel(**sr),
        prior_scheduler=sched(variance_type="fixed_small_log", prediction_type="sample",
                              clip_sample_range=5.0),
        decoder_scheduler=sched(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sched(variance_type="fixed_small_log", prediction_type="epsilon"))
    src = os.path.join(directory, "src")
    pipe.save_pretrained(src)
    return pipe, src


def _step_case(name: str, c: dict, batch: int):
    """(our jitted call, its args, diffusers' call) for one denoising call of model `name`."""
    import diffusers
    import jax
    import numpy as np
    import torch
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from unclip_jax.models import karlo_import as ki

    def comp(m):
        return {"config": dict(m.config), "tensors": {
            k: v.detach().numpy() for k, v in m.state_dict().items()}}
    r = np.random.default_rng(0)
    rows = batch if name == "super_res" else 2 * batch     # guided: cond + uncond rows
    t = np.full((rows,), 500, np.int32)
    torch.manual_seed(0)
    if name == "prior":
        ref = diffusers.PriorTransformer(**c["prior"]).eval()
        model, params, _, _ = ki.convert_prior(comp(ref))
        d, n = model.embed_dim, model.text_ctx
        x, z, h = (r.standard_normal(s).astype(np.float32) for s in ((rows, d), (rows, d),
                                                                     (rows, n, d)))
        mask = np.ones((rows, n), bool)
        ours = jax.jit(model.apply)
        args = ({"params": params}, x, t, {"z_t": z, "token_embeddings": h, "token_mask": mask})

        def theirs():
            return ref(torch.tensor(x), timestep=torch.tensor(t).long(),
                       proj_embedding=torch.tensor(z), encoder_hidden_states=torch.tensor(h),
                       attention_mask=torch.tensor(mask)).predicted_image_embedding
        return ours, args, theirs, ref
    if name == "decoder":
        proj = UnCLIPTextProjModel(**c["text_proj"]).eval()
        ref = diffusers.UNet2DConditionModel(
            in_channels=3, out_channels=6, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            resnet_time_scale_shift="scale_shift", class_embed_type="identity",
            **c["decoder"]).eval()
        model, params, _ = ki.convert_decoder(comp(ref), comp(proj))
        d, n, size = model.clip_dim, 77, c["decoder"]["sample_size"]
        x = r.standard_normal((rows, size, size, 3)).astype(np.float32)
        z, e = (r.standard_normal((rows, d)).astype(np.float32) for _ in range(2))
        h = r.standard_normal((rows, n, d)).astype(np.float32)
        mask = np.ones((rows, n), bool)
        args = ({"params": params}, x, t, z)

        def call(p, x, t, z):
            return model.apply(p, x, t, z, token_mask=mask, text_emb=e, text_states=h)
        ours = jax.jit(call)

        def theirs():
            ctx, emb = proj(image_embeddings=torch.tensor(z), prompt_embeds=torch.tensor(e),
                            text_encoder_hidden_states=torch.tensor(h),
                            do_classifier_free_guidance=False)
            m = torch.nn.functional.pad(torch.tensor(mask), (proj.clip_extra_context_tokens, 0),
                                        value=True)
            return ref(sample=torch.tensor(x).permute(0, 3, 1, 2), timestep=torch.tensor(t).long(),
                       encoder_hidden_states=ctx, class_labels=emb,
                       attention_mask=m).sample.permute(0, 2, 3, 1)
        return ours, args, theirs, (ref, proj)
    sr = dict(in_channels=6, out_channels=3, add_attention=False, **c["super_res"])
    ref = diffusers.UNet2DModel(**sr).eval()
    model, params, _ = ki.convert_upsampler(comp(ref), "super_res_first")
    size = c["super_res"]["sample_size"]
    low_size = size // 4
    x = r.standard_normal((rows, size, size, 3)).astype(np.float32)
    low = np.clip(r.standard_normal((rows, low_size, low_size, 3)), -1, 1).astype(np.float32)
    ours = jax.jit(model.apply)
    args = ({"params": params}, x, t, low)

    def theirs():
        up = torch.nn.functional.interpolate(torch.tensor(low).permute(0, 3, 1, 2),
                                             size=[size, size], mode="bicubic",
                                             align_corners=False, antialias=True)
        return ref(sample=torch.cat([torch.tensor(x).permute(0, 3, 1, 2), up], 1),
                   timestep=torch.tensor(t).long()).sample.permute(0, 2, 3, 1)
    return ours, args, theirs, ref


def _run_ours(ours, args):
    import jax
    return jax.block_until_ready(ours(*args))


def steps_main():
    """--mode=steps: one denoising call per model, ours against diffusers, interleaved."""
    import gc

    import jax
    import numpy as np
    import torch

    c = configs(_SIZE.value)
    res = {"size": _SIZE.value, "batch": _BATCH.value, "dtype": "float32",
           "devices": str(jax.devices()[0].device_kind),
           "torch_threads": torch.get_num_threads(), "models": {}}
    for name in _MODELS.value:
        ours, args, theirs, ref = _step_case(name, c, _BATCH.value)
        n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(args[0]))
        t0 = time.perf_counter()
        out = jax.block_until_ready(ours(*args))
        first = time.perf_counter() - t0
        times = {"ours": [], "diffusers": []}
        with torch.no_grad():
            ref_out = theirs().numpy()
            for r in range(_ROUNDS.value):
                for side, fn in (("ours", functools.partial(_run_ours, ours, args)),
                                 ("diffusers", theirs)):
                    t0 = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - t0)
                print(f"{name} round {r}: ours {times['ours'][-1]:.2f} s, "
                      f"diffusers {times['diffusers'][-1]:.2f} s", flush=True)
        ours_s, ref_s = (statistics.median(times[k]) for k in ("ours", "diffusers"))
        err = float(np.abs(np.asarray(out) - ref_out).max() / (np.abs(ref_out).max() + 1e-12))
        res["models"][name] = {"params": n_params, "rows": int(np.shape(args[1])[0]),
                               "ours_s": ours_s, "diffusers_s": ref_s,
                               "ours_over_diffusers": ours_s / ref_s,
                               "ours_compile_s": first - ours_s, "max_rel_diff": err,
                               "rounds": times}
        print(json.dumps({name: res["models"][name]}), flush=True)
        del ours, args, theirs, ref, out, ref_out
        gc.collect()
    return res


def main(argv):
    del argv
    import torch
    if _THREADS.value:     # both modes (1 on a shared, oversubscribed host: no spinning pool)
        torch.set_num_threads(_THREADS.value)
    if _MODE.value == "steps":
        res = steps_main()
        print(json.dumps(res, indent=1))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(res, f, indent=1)
        return
    import os

    import jax
    import numpy as np

    from unclip_jax import convert
    from unclip_jax.karlo import KarloPipeline

    prompts = ["a red frog on a green leaf"] * _BATCH.value
    with tempfile.TemporaryDirectory() as d:
        ref, src = build(_SIZE.value, d)
        wd = os.path.join(d, "wd")
        convert.convert_karlo(src, wd)
        ours = KarloPipeline.from_workdir(wd)
        n_params = sum(p.numel() for m in (ref.prior, ref.text_proj, ref.decoder,
                                           ref.super_res_first, ref.super_res_last,
                                           ref.text_encoder) for p in m.parameters())

        def run_ours(seed):
            out = ours.text_to_image(prompts, seed=seed)["images"]  # Karlo's preset
            return jax.block_until_ready(out)

        def run_ref(seed):
            with torch.no_grad():
                return ref(prompts, generator=torch.Generator().manual_seed(seed),
                           output_type="np").images

        t0 = time.perf_counter()
        first = run_ours(0)
        first_call = time.perf_counter() - t0
        times = {"ours": [], "diffusers": []}
        for r in range(_ROUNDS.value):
            for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
                t0 = time.perf_counter()
                out = fn(r + 1)
                times[name].append(time.perf_counter() - t0)
            print(f"round {r}: ours {times['ours'][-1]:.2f} s, "
                  f"diffusers {times['diffusers'][-1]:.2f} s", flush=True)
        ours_s, ref_s = (statistics.median(times[k]) for k in ("ours", "diffusers"))
        res = {"size": _SIZE.value, "batch": _BATCH.value, "params": n_params,
               "dtype": "float32", "devices": str(jax.devices()[0].device_kind),
               "torch_threads": torch.get_num_threads(), "ours_s": ours_s,
               "diffusers_s": ref_s, "ours_over_diffusers": ours_s / ref_s,
               "ours_first_call_s": first_call, "ours_compile_s": first_call - ours_s,
               "rounds": times, "image_shape": list(np.shape(out)),
               "finite": bool(np.all(np.isfinite(first)))}
    print(json.dumps(res, indent=1))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    app.run(main)
