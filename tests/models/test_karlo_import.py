"""Karlo import parity with diffusers: a tiny random UnCLIPPipeline with Karlo's block types is
saved locally, converted, and each component's output compared with diffusers' on the same
inputs (prior, text_proj, decoder, both upsamplers, text encoder, the scheduler's step)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the `test` extra installs torch (CPU) and diffusers for this file

from helpers.karlo_pipeline import D, L, VISION_SIZE, build_tiny_karlo, build_tiny_variations
from unclip_jax import convert, diffusion
from unclip_jax.models import karlo_import as ki
from unclip_jax.models.clip import CLIP

B = 2
RTOL = ATOL = 1e-4


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo")
    src, pipe = build_tiny_karlo(root)
    variations, vpipe = build_tiny_variations(root, pipe)
    return dict(src=src, root=root, pipe=pipe, comps=ki.read_pipeline(src),
                variations=variations, vpipe=vpipe)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _mask():
    m = np.zeros((B, L), bool)
    m[0, :5], m[1, :3] = True, True
    return m


def _t(x):
    return torch.tensor(np.asarray(x))


def _close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=RTOL, atol=ATOL)


def test_prior_matches_diffusers(karlo):
    model, params, scaling, _ = ki.convert_prior(karlo["comps"]["prior"])
    r = _rng(1)
    x = r.standard_normal((B, D)).astype(np.float32)
    z_t = r.standard_normal((B, D)).astype(np.float32)
    hid = r.standard_normal((B, L, D)).astype(np.float32)
    t = np.array([999, 17], np.int32)
    mask = _mask()
    ours = jax.jit(model.apply)({"params": params}, x, t, {
        "z_t": z_t, "token_embeddings": hid, "token_mask": mask})
    with torch.no_grad():
        ref = karlo["pipe"].prior(_t(x), timestep=_t(t).long(), proj_embedding=_t(z_t),
                                  encoder_hidden_states=_t(hid),
                                  attention_mask=_t(mask)).predicted_image_embedding
        post = karlo["pipe"].prior.post_process_latents(_t(x))
    _close(ours, ref)
    _close(scaling.image_inverse(jnp.asarray(x)), post)


def _decoder_inputs():
    r = _rng(2)
    return dict(x=r.standard_normal((B, 8, 8, 3)).astype(np.float32),
                t=np.array([999, 40], np.int32),
                z_i=r.standard_normal((B, D)).astype(np.float32),
                text_emb=r.standard_normal((B, D)).astype(np.float32),
                states=r.standard_normal((B, L, D)).astype(np.float32), mask=_mask())


def test_text_proj_and_decoder_match_diffusers(karlo):
    model, params, _ = ki.convert_decoder(karlo["comps"]["decoder"], karlo["comps"]["text_proj"])
    i = _decoder_inputs()
    fn = jax.jit(model.apply, static_argnames=("conditioning_only",))
    kw = dict(token_mask=i["mask"], text_emb=i["text_emb"], text_states=i["states"])
    emb, ctx, ctx_mask = fn({"params": params}, i["x"], i["t"], i["z_i"], conditioning_only=True,
                            **kw)
    out = fn({"params": params}, i["x"], i["t"], i["z_i"], **kw)
    pipe = karlo["pipe"]
    with torch.no_grad():
        ref_ctx, ref_emb = pipe.text_proj(
            image_embeddings=_t(i["z_i"]), prompt_embeds=_t(i["text_emb"]),
            text_encoder_hidden_states=_t(i["states"]), do_classifier_free_guidance=False)
        ref_mask = torch.nn.functional.pad(_t(i["mask"]), (2, 0), value=True)
        ref = pipe.decoder(sample=_t(i["x"]).permute(0, 3, 1, 2), timestep=_t(i["t"]).long(),
                           encoder_hidden_states=ref_ctx, class_labels=ref_emb,
                           attention_mask=ref_mask).sample.permute(0, 2, 3, 1)
    _close(emb, ref_emb)
    _close(ctx, ref_ctx)
    np.testing.assert_array_equal(ctx_mask, ref_mask.numpy())
    _close(out, ref)
    # The learned null image embedding is diffusers' classifier-free-guidance embedding.
    _close(params["null_image_emb"],
           pipe.text_proj.learned_classifier_free_guidance_embeddings.detach())


def test_upsamplers_match_diffusers(karlo):
    r = _rng(3)
    x = r.standard_normal((B, 16, 16, 3)).astype(np.float32)
    small = np.clip(r.standard_normal((B, 8, 8, 3)), -1, 1).astype(np.float32)
    t = np.array([999, 0], np.int32)
    fn = None
    for name in ("super_res_first", "super_res_last"):   # one architecture: one compile
        model, params, _ = ki.convert_upsampler(karlo["comps"][name], name)
        fn = fn or jax.jit(model.apply)
        ours = fn({"params": params}, x, t, small)
        with torch.no_grad():
            up = torch.nn.functional.interpolate(_t(small).permute(0, 3, 1, 2), size=[16, 16],
                                                 mode="bicubic", align_corners=False,
                                                 antialias=True)
            unet = getattr(karlo["pipe"], name)
            ref = unet(sample=torch.cat([_t(x).permute(0, 3, 1, 2), up], 1),
                       timestep=_t(t).long()).sample.permute(0, 2, 3, 1)
        _close(ours, ref)


def test_text_encoder_matches_transformers(karlo):
    model, params, _ = ki.convert_text_encoder(karlo["comps"]["text_encoder"])
    from unclip_jax.data.tokenizer import Tokenizer
    tok = Tokenizer.from_hf(karlo["comps"]["tokenizer"]["dir"])
    tokens, mask = tok.encode(["a red", "red"])
    ref_ids = karlo["pipe"].tokenizer(["a red", "red"], padding="max_length",
                                      max_length=L)["input_ids"]
    np.testing.assert_array_equal(tokens, np.array(ref_ids))
    ours = model.apply({"params": params}, jnp.asarray(tokens), method=CLIP.encode_text)
    with torch.no_grad():
        ref = karlo["pipe"].text_encoder(torch.tensor(tokens.astype(np.int64)))
    _close(ours["features"], ref.text_embeds)
    _close(ours["token_encodings"], ref.last_hidden_state)


def test_image_encoder_matches_transformers(karlo):
    """The vision tower of Karlo's image-variations layout: our z_i (projected, unnormalised)
    against CLIPVisionModelWithProjection's image_embeds for the same pixels."""
    from unclip_jax.models.clip import to_clip_pixels
    comp = ki.read_image_encoder(karlo["variations"])
    assert comp["dir"].endswith("image_encoder")
    model, params, manifest = ki.convert_image_encoder(comp, karlo["comps"]["text_encoder"][
        "config"])
    assert sorted(params) == ["vision_model", "visual_projection"]
    assert ("visual_projection.weight", [D, 24]) in [tuple(m) for m in manifest]
    x = _rng(5).uniform(-1, 1, (B, VISION_SIZE, VISION_SIZE, 3)).astype(np.float32)
    # (CLIP's setup needs its temperature; the pipeline merges the text encoder's params in.)
    ours = model.apply({"params": dict(params, logit_scale=jnp.zeros(()))}, jnp.asarray(x),
                       method=CLIP.encode_image)
    with torch.no_grad():
        ref = karlo["vpipe"].image_encoder(
            pixel_values=_t(to_clip_pixels(x)).permute(0, 3, 1, 2)).image_embeds
    _close(ours["features"], ref)
    # The embeddings differ between images (a constant output would also "match" a bug).
    assert np.abs(np.asarray(ours["features"][0] - ours["features"][1])).max() > 1e-2


def test_image_encoder_from_a_hf_clip_folder_and_bad_ones(karlo, tmp_path):
    from unclip_jax.models.clip_import import write_random_hf_clip
    text_cfg = karlo["comps"]["text_encoder"]["config"]
    hf = str(tmp_path / "hf")
    write_random_hf_clip(hf, image_size=16, patch=8, vision_width=24, projection_dim=D)
    comp = ki.read_image_encoder(hf)           # a CLIPModel folder: its vision tower only
    assert not [k for k in comp["tensors"] if k.startswith("text_model")]
    _, params, _ = ki.convert_image_encoder(comp, text_cfg)
    from safetensors.numpy import load_file
    w = load_file(os.path.join(hf, "model.safetensors"))["visual_projection.weight"]
    np.testing.assert_array_equal(params["visual_projection"]["Dense_0"]["kernel"], w.T)
    with pytest.raises(ki.KarloFormatError, match="projection_dim 8"):
        bad = str(tmp_path / "hf8")
        write_random_hf_clip(bad, image_size=16, patch=8, vision_width=24, projection_dim=8)
        ki.convert_image_encoder(ki.read_image_encoder(bad), text_cfg)
    with pytest.raises(ki.KarloFormatError, match="without image_encoder"):
        ki.read_image_encoder(karlo["src"])    # the text -> image release has no vision tower
    with pytest.raises(ki.KarloFormatError, match="CLIPTextModelWithProjection"):
        ki.read_image_encoder(os.path.join(karlo["src"], "text_encoder"))


@pytest.mark.parametrize("which", ["prior", "decoder", "super_res"])
def test_scheduler_step_matches_diffusers(karlo, which):
    """Karlo's spacing, variance (fixed_small_log / learned_range) and x0 clipping, step by step."""
    s = ki.scheduler_settings(karlo["comps"][f"{which}_scheduler"]["config"], which)
    ref_sched = getattr(karlo["pipe"], f"{which}_scheduler")
    # diffusers' float32 alpha_bar loses digits where it is near 1 or 0 (1 - alpha_bar_0 and
    # 1 - alpha_bar_999 / alpha_bar_957 keep ~3 and ~1 digits); ours is computed in float64.
    # Compare with its arithmetic in float64, from its own betas.
    ref_sched.betas = ref_sched.betas.double()
    ref_sched.alphas = 1.0 - ref_sched.betas
    ref_sched.alphas_cumprod = torch.cumprod(ref_sched.alphas, 0)
    steps = 7 if which == "super_res" else 25
    ref_sched.set_timesteps(steps)
    ts = ref_sched.timesteps.numpy()
    fast = diffusion.respace(diffusion.make_schedule(s["schedule"], s["num_timesteps"]),
                             f"karlo{steps}")
    np.testing.assert_array_equal(np.asarray(fast.timestep_map)[::-1], ts)
    r = _rng(4)
    shape = (B, D) if which == "prior" else (B, 4, 4, 3)
    channels = 6 if which == "decoder" else shape[-1]
    for i in (0, 1, steps // 2, steps - 1):
        x = r.standard_normal(shape).astype(np.float32)
        # Large outputs so that x0 clipping (at 5 for the prior, 1 otherwise) is exercised.
        out = 3 * r.standard_normal(shape[:-1] + (channels,)).astype(np.float32)
        if which == "decoder":
            out[..., 3:] = np.tanh(out[..., 3:])
        gen = torch.Generator().manual_seed(i)
        noise = torch.randn(shape if which == "prior" else (B, 3, 4, 4),
                            generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        prev = None if i == steps - 1 else int(ts[i + 1])
        to_t = (lambda a: _t(a).double()) if which == "prior" else (
            lambda a: _t(a).double().permute(0, 3, 1, 2))
        ref = ref_sched.step(to_t(out), int(ts[i]), to_t(x), prev_timestep=prev, generator=gen)
        ref_prev = ref.prev_sample if which == "prior" else ref.prev_sample.permute(0, 2, 3, 1)
        ref_x0 = ref.pred_original_sample
        ref_x0 = ref_x0 if which == "prior" else ref_x0.permute(0, 2, 3, 1)
        n = steps - 1 - i
        our_noise = (noise if which == "prior" else noise.permute(0, 2, 3, 1)).float().numpy()
        x_prev, x0 = diffusion.ddpm_step(fast, jnp.asarray(x), n, jnp.asarray(out),
                                         jnp.asarray(our_noise),
                                         parameterization=s["parameterization"],
                                         var_type=s["var_type"], clip_x0=s["clip_x0"])
        _close(x0, ref_x0)
        _close(x_prev, ref_prev)


# ---------------------------------------------------------------------------------- converting
def test_convert_writes_workdir_with_manifest(karlo, tmp_path):
    out = str(tmp_path / "wd")
    manifest = convert.convert_karlo(karlo["src"], out, "bfloat16",
                                     image_encoder=karlo["variations"])
    assert manifest["image_encoder_source"] == os.path.join(karlo["variations"], "image_encoder")
    for name in convert.CHECKPOINTED + ("tokenizer", "image_encoder"):
        assert os.path.isdir(os.path.join(out, name)), name
    with open(os.path.join(out, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(manifest))
    entries = dict(map(tuple, [(n, tuple(s)) for n, s in on_disk["tensors"]["prior"]]))
    assert entries["prd_embedding"] == (1, 1, 16)
    assert entries["clip_std"] == (1, 16)
    names = {n for n, _ in on_disk["tensors"]["decoder+text_proj"]}
    assert "learned_classifier_free_guidance_embeddings" in names
    assert "mid_block.attentions.0.add_k_proj.weight" in names
    assert ["vision_model.post_layernorm.weight", [24]] in on_disk["tensors"]["image_encoder"]
    with open(os.path.join(out, convert.WORKDIR_FILE)) as f:
        meta = json.load(f)
    assert meta["dtype"] == on_disk["dtype"] == "bfloat16"
    assert meta["configs"]["image_encoder"]["image_size"] == VISION_SIZE
    assert meta["schedulers"]["prior"] == {
        "var_type": "fixed_small", "parameterization": "x0", "clip_x0": 5.0,
        "num_timesteps": 1000, "schedule": "cosine"}
    import orbax.checkpoint as ocp
    restored = ocp.StandardCheckpointer().restore(os.path.join(out, "prior"))
    assert restored["query"].dtype == jnp.bfloat16
    _, params, _, _ = ki.convert_prior(karlo["comps"]["prior"])
    np.testing.assert_array_equal(np.asarray(restored["query"], np.float32),
                                  np.asarray(params["query"].astype(jnp.bfloat16), np.float32))


def _copy(karlo, tmp_path):
    d = str(tmp_path / "bad")
    shutil.copytree(karlo["src"], d)
    return d


def test_bad_input_is_named_and_writes_nothing(karlo, tmp_path):
    out = str(tmp_path / "wd")
    with pytest.raises(ki.KarloFormatError, match="model_index.json"):
        convert.convert_karlo(str(tmp_path), out)          # not a pipeline folder
    d = _copy(karlo, tmp_path)
    shutil.rmtree(os.path.join(d, "super_res_last"))
    with pytest.raises(ki.KarloFormatError, match="super_res_last"):
        convert.convert_karlo(d, out)
    shutil.rmtree(d)
    d = _copy(karlo, tmp_path)
    from safetensors.numpy import load_file, save_file
    f = os.path.join(d, "decoder", "diffusion_pytorch_model.safetensors")
    tensors = load_file(f)
    name = "down_blocks.1.attentions.0.add_k_proj.weight"
    tensors[name] = tensors[name][:, :-1]
    save_file(tensors, f)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        convert.convert_karlo(d, out)
    with open(os.path.join(d, "decoder", "config.json")) as fh:
        cfg = json.load(fh)
    cfg["down_block_types"][1] = "CrossAttnDownBlock2D"
    with open(os.path.join(d, "decoder", "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ki.KarloFormatError, match="CrossAttnDownBlock2D"):
        convert.convert_karlo(d, out)
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".convert-")] == []
