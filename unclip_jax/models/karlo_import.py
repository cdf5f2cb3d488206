"""Import Karlo (kakaobrain/karlo-v1-alpha, diffusers' UnCLIPPipeline layout) into our models.

    comps = read_pipeline("/path/to/karlo-v1-alpha")        # configs + safetensors, no torch
    prior, params, stats = convert_prior(comps["prior"])      # DiffusionPrior, clip_mean/std
    decoder, params = convert_decoder(comps["decoder"], comps["text_proj"])
    up, params = convert_upsampler(comps["super_res_first"])  # and super_res_last
    clip, params = convert_text_encoder(comps["text_encoder"])  # our CLIP, text tower only
    clip, params = convert_image_encoder(read_image_encoder(DIR2), comps["text_encoder"]["config"])
        # its vision tower (variations, evaluation): DIR2 is karlo-v1-alpha-image-variations,
        # a CLIPVisionModelWithProjection folder or a Hugging Face CLIPModel folder

Each diffusers module maps onto an existing module of ours with the options Karlo needs:
`PriorTransformer` -> `DiffusionPrior(gelu_approximate=False)` (its sequence and causal mask are
ours; clip_mean/clip_std become an `EmbeddingScaling`), `UNet2DConditionModel` with Karlo's
blocks + `UnCLIPTextProjModel` -> `Decoder(clip_text_width=...)` (BigGAN res blocks, attention
with context K/V and a context mask, learned-range output), `UNet2DModel` -> `Upsampler(resize=
"cubic")`. `scheduler_settings` maps an `UnCLIPScheduler` config onto our sampler's arguments.
A folder, config value or tensor that does not fit raises `KarloFormatError` naming it.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import clip_import
from unclip_jax.models.prior import DiffusionPrior, EmbeddingScaling
from unclip_jax.models.unet import Decoder, Upsampler

COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last",
              "text_encoder", "tokenizer", "prior_scheduler", "decoder_scheduler",
              "super_res_scheduler")
# diffusers class each folder must hold (config.json "_class_name"; the text encoder's
# "architectures").
CLASSES = {"prior": "PriorTransformer", "text_proj": "UnCLIPTextProjModel",
           "decoder": "UNet2DConditionModel", "super_res_first": "UNet2DModel",
           "super_res_last": "UNet2DModel", "prior_scheduler": "UnCLIPScheduler",
           "decoder_scheduler": "UnCLIPScheduler", "super_res_scheduler": "UnCLIPScheduler"}


class KarloFormatError(ValueError):
    """The source folder is not Karlo's diffusers layout (the message names what and where)."""


# ------------------------------------------------------------------------------------ reading
def read_pipeline(src: str) -> dict:
    """{component: {"dir", "config", "tensors" (numpy, absent for schedulers/tokenizer)}}."""
    if not os.path.isdir(src):
        raise KarloFormatError(f"karlo: {src!r} is not a directory")
    index = os.path.join(src, "model_index.json")
    if not os.path.exists(index):
        raise KarloFormatError(f"karlo: {src!r} has no model_index.json: not a diffusers "
                               "pipeline folder")
    with open(index) as f:
        idx = json.load(f)
    if idx.get("_class_name") != "UnCLIPPipeline":
        raise KarloFormatError(f"karlo: {index} is a {idx.get('_class_name')!r}, not an "
                               "UnCLIPPipeline (Karlo's layout)")
    out = {}
    for name in COMPONENTS:
        d = os.path.join(src, name)
        if name not in idx or not os.path.isdir(d):
            raise KarloFormatError(f"karlo: component {name!r} missing from {src!r} (expected "
                                   f"the folder {d})")
        if name == "tokenizer":
            out[name] = {"dir": d}
            continue
        cfg_file = os.path.join(d, "scheduler_config.json" if name.endswith("scheduler")
                                else "config.json")
        if not os.path.exists(cfg_file):
            raise KarloFormatError(f"karlo: {cfg_file} is missing")
        with open(cfg_file) as f:
            cfg = json.load(f)
        want = CLASSES.get(name)
        got = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
        if want is not None and got != want:
            raise KarloFormatError(f"karlo: {cfg_file} describes a {got!r}, Karlo's {name} is a "
                                   f"{want!r}")
        comp = {"dir": d, "config": cfg}
        if not name.endswith("scheduler"):
            try:
                comp["tensors"] = clip_import.read_safetensors(d)
            except FileNotFoundError as e:
                raise KarloFormatError(f"karlo: {name}: {e}") from None
        out[name] = comp
    return out


def _require(cfg: dict, where: str, **expected):
    for k, v in expected.items():
        if cfg.get(k, v) != v:
            raise KarloFormatError(f"karlo: {where}/config.json: {k}={cfg.get(k)!r} is not "
                                   f"supported (Karlo's layout has {v!r})")


def _convert(model, init_args, mapping: dict, tensors: dict, where: str,
             init_kw: dict | None = None) -> tuple[dict, list]:
    """Our params for `model` from diffusers tensors, through clip_import's checked mapper."""
    from flax import linen as nn
    from flax.traverse_util import flatten_dict

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args,
                                               **(init_kw or {})))
    expected = flatten_dict(nn.meta.unbox(shapes)["params"])
    params = clip_import.map_tensors(expected, mapping, tensors, f"karlo {where}")
    unused = sorted(set(tensors) - {n for names, _ in mapping.values() for n in names})
    if unused:
        raise KarloFormatError(f"karlo: {where}: tensors {unused[:5]} are not part of Karlo's "
                               "layout (a different architecture?)")
    manifest = [(n, list(np.shape(tensors[n]))) for n in sorted(tensors)]
    return params, manifest


def _t(w):
    return w.T


def _linear(ours: tuple, theirs: str) -> dict:
    return {ours + ("Dense_0", "kernel"): ([f"{theirs}.weight"], _t),
            ours + ("Dense_0", "bias"): ([f"{theirs}.bias"], None)}


def _ln(ours: tuple, theirs: str) -> dict:
    return {ours + ("LayerNorm_0", "scale"): ([f"{theirs}.weight"], None),
            ours + ("LayerNorm_0", "bias"): ([f"{theirs}.bias"], None)}


def _gn(ours: tuple, theirs: str) -> dict:
    return {ours + ("scale",): ([f"{theirs}.weight"], None),
            ours + ("bias",): ([f"{theirs}.bias"], None)}


def _conv(ours: tuple, theirs: str) -> dict:
    return {ours + ("Conv_0", "kernel"): ([f"{theirs}.weight"], lambda w: w.transpose(2, 3, 1, 0)),
            ours + ("Conv_0", "bias"): ([f"{theirs}.bias"], None)}


def _fused(heads: int, parts: int):
    """torch [out, in] x parts -> our fused kernel [in, heads * parts * head_dim] and bias."""
    def kernel(*ws):
        w = np.stack([x.T for x in ws], 1)                      # [in, parts, W]
        d_in, _, width = w.shape
        w = w.reshape(d_in, parts, heads, width // heads).transpose(0, 2, 1, 3)
        return w.reshape(d_in, parts * width)

    def bias(*bs):
        return np.stack(bs, 0).reshape(parts, heads, -1).transpose(1, 0, 2).reshape(-1)
    return kernel, bias


# ------------------------------------------------------------------------------------- prior
def prior_model(cfg: dict, dtype=jnp.float32) -> DiffusionPrior:
    where = "prior"
    _require(cfg, where, norm_in_type=None, embedding_proj_norm_type=None,
             encoder_hid_proj_type="linear", added_emb_type="prd", additional_embeddings=4,
             time_embed_act_fn="silu")
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    dim = int(cfg["embedding_dim"])
    for k in ("time_embed_dim",):
        if cfg.get(k) not in (None, width):
            raise KarloFormatError(f"karlo: prior/config.json: {k}={cfg[k]} must equal the "
                                   f"transformer width {width}")
    for k in ("embedding_proj_dim", "clip_embed_dim"):
        if cfg.get(k) not in (None, dim):
            raise KarloFormatError(f"karlo: prior/config.json: {k}={cfg[k]} must equal "
                                   f"embedding_dim {dim}")
    return DiffusionPrior(embed_dim=dim, width=width, depth=int(cfg["num_layers"]),
                          heads=int(cfg["num_attention_heads"]),
                          text_ctx=int(cfg["num_embeddings"]), gelu_approximate=False,
                          dtype=dtype)


def prior_mapping(model: DiffusionPrior) -> dict:
    m = {}
    m.update(_linear(("time_1",), "time_embedding.linear_1"))
    m.update(_linear(("time_2",), "time_embedding.linear_2"))
    m.update(_linear(("x_proj",), "proj_in"))
    m.update(_linear(("caption", "text_emb_proj"), "embedding_proj"))
    m.update(_linear(("caption", "token_proj"), "encoder_hidden_states_proj"))
    m[("positional_embedding",)] = (["positional_embedding"], lambda w: w.reshape(w.shape[-2:]))
    m[("query",)] = (["prd_embedding"], lambda w: w.reshape(-1))
    kern, bias = _fused(model.heads, 3)
    for i in range(model.depth):
        ours, theirs = ("transformer", f"block_{i}"), f"transformer_blocks.{i}"
        a = f"{theirs}.attn1"
        m[ours + ("attn", "qkv", "Dense_0", "kernel")] = (
            [f"{a}.to_{p}.weight" for p in "qkv"], kern)
        m[ours + ("attn", "qkv", "Dense_0", "bias")] = ([f"{a}.to_{p}.bias" for p in "qkv"], bias)
        m.update(_linear(ours + ("attn", "out"), f"{a}.to_out.0"))
        m.update(_ln(ours + ("ln_1",), f"{theirs}.norm1"))
        m.update(_ln(ours + ("ln_2",), f"{theirs}.norm3"))
        m.update(_linear(ours + ("mlp", "fc"), f"{theirs}.ff.net.0.proj"))
        m.update(_linear(ours + ("mlp", "proj"), f"{theirs}.ff.net.2"))
    m.update(_ln(("transformer", "ln_final"), "norm_out"))
    m.update(_linear(("out",), "proj_to_clip_embeddings"))
    return m


def prior_scaling(tensors: dict) -> EmbeddingScaling:
    """clip_mean / clip_std un-normalise the prior's output; its text inputs are raw CLIP."""
    for k in ("clip_mean", "clip_std"):
        if k not in tensors:
            raise KarloFormatError(f"karlo: prior: tensor {k!r} missing")
    return EmbeddingScaling(image_mean=np.asarray(tensors["clip_mean"], np.float32).reshape(-1),
                            image_std=np.asarray(tensors["clip_std"], np.float32).reshape(-1))


def convert_prior(comp: dict, dtype=jnp.float32):
    """(DiffusionPrior, params, EmbeddingScaling, manifest) from the prior component."""
    model = prior_model(comp["config"], dtype)
    b, d, ctx = 1, model.embed_dim, model.text_ctx
    cond = {"z_t": jnp.zeros((b, d)), "token_embeddings": jnp.zeros((b, ctx, d)),
            "token_mask": jnp.ones((b, ctx), bool)}
    mapping = prior_mapping(model)
    tensors = dict(comp["tensors"])
    scaling = prior_scaling(tensors)
    stats = {k: tensors.pop(k) for k in ("clip_mean", "clip_std")}
    params, manifest = _convert(model, (jnp.zeros((b, d)), jnp.zeros((b,), jnp.int32), cond),
                                mapping, tensors, "prior")
    manifest += [(k, list(v.shape)) for k, v in stats.items()]
    return model, params, scaling, manifest


# -------------------------------------------------------------------------------------- U-Nets
_DOWN = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}


def _unet_kwargs(cfg: dict, where: str, dtype) -> dict:
    _require(cfg, where, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
             act_fn="silu", center_input_sample=False, norm_eps=1e-5, dropout=0.0,
             mid_block_scale_factor=1, downsample_padding=1)
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    bad = [b for b in downs if b not in _DOWN] + [b for b in ups if b not in _UP]
    if bad:
        raise KarloFormatError(f"karlo: {where}/config.json: block types {bad} are not Karlo's "
                               f"(down: {sorted(_DOWN)}, up: {sorted(_UP)})")
    attn = [_DOWN[b] for b in downs]
    if [_UP[b] for b in reversed(ups)] != attn:
        raise KarloFormatError(f"karlo: {where}/config.json: up_block_types do not mirror "
                               "down_block_types")
    chans = [int(c) for c in cfg["block_out_channels"]]
    base = chans[0]
    if any(c % base for c in chans):
        raise KarloFormatError(f"karlo: {where}/config.json: block_out_channels {chans} are not "
                               f"multiples of {base}")
    head = cfg.get("attention_head_dim")
    head = int(head[0] if isinstance(head, (list, tuple)) else head or 64)
    cin, cout = int(cfg["in_channels"]), int(cfg["out_channels"])
    return dict(base_channels=base, channel_mult=tuple(c // base for c in chans),
                num_res_blocks=int(cfg["layers_per_block"]),
                attention_ds=tuple(2 ** i for i, a in enumerate(attn) if a), head_channels=head,
                dropout=0.0, out_channels=3, learn_sigma=cout == 6,
                norm_groups=int(cfg.get("norm_num_groups", 32)),
                scale_shift=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
                remat=False, scan_blocks=False, dtype=dtype, param_dtype=jnp.float32), cin, cout


def unet_mapping(u: dict, prefix: tuple = ("unet",)) -> dict:
    """Our UNet params -> diffusers UNet2DModel / UNet2DConditionModel tensor names."""
    m = {}
    m.update(_linear(prefix + ("time_fc1",), "time_embedding.linear_1"))
    m.update(_linear(prefix + ("time_fc2",), "time_embedding.linear_2"))
    m.update(_conv(prefix + ("conv_in",), "conv_in"))
    m.update(_gn(prefix + ("norm_out",), "conv_norm_out"))
    m.update(_conv(prefix + ("conv_out",), "conv_out"))

    def res(ours, theirs):
        m.update(_gn(prefix + (ours, "norm_in"), f"{theirs}.norm1"))
        m.update(_conv(prefix + (ours, "conv_in"), f"{theirs}.conv1"))
        m.update(_linear(prefix + (ours, "emb_proj"), f"{theirs}.time_emb_proj"))
        m.update(_gn(prefix + (ours, "norm_out"), f"{theirs}.norm2"))
        m.update(_conv(prefix + (ours, "conv_out"), f"{theirs}.conv2"))
        m.update(_conv(prefix + (ours, "skip"), f"{theirs}.conv_shortcut"))

    def attn(ours, theirs, channels):
        heads = channels // u["head_channels"]
        m.update(_gn(prefix + (ours, "norm"), f"{theirs}.group_norm"))
        k3, b3 = _fused(heads, 3)
        k2, b2 = _fused(heads, 2)
        d = prefix + (ours,)
        m[d + ("qkv", "Dense_0", "kernel")] = ([f"{theirs}.to_{p}.weight" for p in "qkv"], k3)
        m[d + ("qkv", "Dense_0", "bias")] = ([f"{theirs}.to_{p}.bias" for p in "qkv"], b3)
        m[d + ("context_kv", "Dense_0", "kernel")] = (
            [f"{theirs}.add_{p}_proj.weight" for p in "kv"], k2)
        m[d + ("context_kv", "Dense_0", "bias")] = (
            [f"{theirs}.add_{p}_proj.bias" for p in "kv"], b2)
        m.update(_linear(d + ("proj_out",), f"{theirs}.to_out.0"))

    mults, base, n = u["channel_mult"], u["base_channels"], u["num_res_blocks"]
    levels = len(mults)
    for lv, mult in enumerate(mults):
        ch, has_attn = base * mult, 2 ** lv in u["attention_ds"]
        for i in range(n):
            res(f"down_{lv}_{i}", f"down_blocks.{lv}.resnets.{i}")
            if has_attn:
                attn(f"down_{lv}_{i}_attn", f"down_blocks.{lv}.attentions.{i}", ch)
        if lv != levels - 1:
            res(f"down_{lv}_resample", f"down_blocks.{lv}.downsamplers.0")
        j = levels - 1 - lv
        for i in range(n + 1):
            res(f"up_{lv}_{i}", f"up_blocks.{j}.resnets.{i}")
            if has_attn:
                attn(f"up_{lv}_{i}_attn", f"up_blocks.{j}.attentions.{i}", ch)
        if lv:
            res(f"up_{lv}_resample", f"up_blocks.{j}.upsamplers.0")
    res("mid_0", "mid_block.resnets.0")
    res("mid_1", "mid_block.resnets.1")
    if u["attention_ds"]:
        attn("mid_attn", "mid_block.attentions.0", base * mults[-1])
    return m


def _present(mapping: dict, tensors: dict) -> dict:
    """Drop the 1x1 skip convs the checkpoint does not have (diffusers creates them only where
    channels change, as our ResBlock does); any other gap is reported by the mapper."""
    return {k: v for k, v in mapping.items()
            if not (len(k) >= 3 and k[-3] == "skip" and v[0][0] not in tensors)}


def decoder_model(unet_cfg: dict, proj_cfg: dict, dtype=jnp.float32) -> Decoder:
    _require(unet_cfg, "decoder", class_embed_type="identity",
             mid_block_type="UNetMidBlock2DSimpleCrossAttn", only_cross_attention=False,
             addition_embed_type=None, encoder_hid_dim=None, cross_attention_norm=None,
             resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_dim=None,
             conv_in_kernel=3, conv_out_kernel=3)
    u, cin, cout = _unet_kwargs(unet_cfg, "decoder", dtype)
    if cin != 3 or cout not in (3, 6):
        raise KarloFormatError(f"karlo: decoder/config.json: in/out_channels {cin}/{cout}; "
                               "Karlo's decoder maps 3 channels to 3 (+3 variance)")
    ed = 4 * u["base_channels"]
    if int(proj_cfg["time_embed_dim"]) != ed:
        raise KarloFormatError(f"karlo: text_proj/config.json: time_embed_dim "
                               f"{proj_cfg['time_embed_dim']} != the decoder's {ed}")
    if int(proj_cfg["cross_attention_dim"]) != int(unet_cfg["cross_attention_dim"]):
        raise KarloFormatError("karlo: text_proj/config.json: cross_attention_dim differs from "
                               "decoder/config.json's")
    dim = int(proj_cfg["clip_embeddings_dim"])
    return Decoder(unet=u, clip_dim=dim, clip_tokens=int(proj_cfg["clip_extra_context_tokens"]),
                   clip_text_width=dim, context_dim=int(proj_cfg["cross_attention_dim"]))


def decoder_mapping(model: Decoder) -> dict:
    m = unet_mapping(model.unet)
    t, w = model.clip_tokens, model.context_dim

    # diffusers reshapes the token projection to [B, W, T] and transposes: output w * T + i is
    # channel w of token i; ours is i * W + w.
    def tok_kernel(k):
        return k.reshape(w, t, -1).transpose(1, 0, 2).reshape(t * w, -1).T

    m[("null_image_emb",)] = (["learned_classifier_free_guidance_embeddings"], None)
    m.update(_linear(("clip_emb_proj",), "clip_image_embeddings_project_to_time_embeddings"))
    m[("clip_tok_proj", "Dense_0", "kernel")] = (["clip_extra_context_tokens_proj.weight"],
                                                 tok_kernel)
    m[("clip_tok_proj", "Dense_0", "bias")] = (
        ["clip_extra_context_tokens_proj.bias"], lambda b: b.reshape(w, t).T.reshape(-1))
    m.update(_linear(("clip_text_emb_proj",), "embedding_proj"))
    m.update(_linear(("clip_text_seq_proj",), "encoder_hidden_states_proj"))
    m.update(_ln(("clip_text_seq_norm",), "text_encoder_hidden_states_norm"))
    return m


def decoder_inputs(model: Decoder, b: int = 1, length: int = 4):
    size = 8 * 2 ** (len(model.unet["channel_mult"]) - 1)
    d = model.clip_dim
    return ((jnp.zeros((b, size, size, 3)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, d))),
            dict(token_mask=jnp.ones((b, length), bool), text_emb=jnp.zeros((b, d)),
                 text_states=jnp.zeros((b, length, d))))


def convert_decoder(comp: dict, proj: dict, dtype=jnp.float32):
    """(Decoder, params, manifest) from the decoder and text_proj components."""
    model = decoder_model(comp["config"], proj["config"], dtype)
    clash = set(comp["tensors"]) & set(proj["tensors"])
    if clash:
        raise KarloFormatError(f"karlo: decoder and text_proj share tensor names "
                               f"{sorted(clash)[:3]}")
    tensors = {**comp["tensors"], **proj["tensors"]}
    args, kw = decoder_inputs(model)
    mapping = _present(decoder_mapping(model), tensors)
    params, manifest = _convert(model, args, mapping, tensors, "decoder", kw)
    return model, params, manifest


def upsampler_model(cfg: dict, where: str, dtype=jnp.float32) -> Upsampler:
    _require(cfg, where, add_attention=False, class_embed_type=None, time_embedding_dim=None)
    u, cin, cout = _unet_kwargs(cfg, where, dtype)
    if u["attention_ds"] or cin != 6 or cout != 3:
        raise KarloFormatError(f"karlo: {where}/config.json: Karlo's upsamplers are "
                               "attention-free with 6 input and 3 output channels")
    return Upsampler(unet=u, resize="cubic")


def convert_upsampler(comp: dict, where: str, dtype=jnp.float32):
    """(Upsampler, params, manifest) from super_res_first or super_res_last."""
    model = upsampler_model(comp["config"], where, dtype)
    size = 8 * 2 ** (len(model.unet["channel_mult"]) - 1)
    x = jnp.zeros((1, size, size, 3))
    mapping = _present(unet_mapping(model.unet), comp["tensors"])
    params, manifest = _convert(model, (x, jnp.zeros((1,), jnp.int32), x), mapping,
                                comp["tensors"], where)
    return model, params, manifest


# ----------------------------------------------------------------------------- text encoder
# Stands in for the vision tower when none was converted: no weights, never run.
_NO_VISION = dict(image_size=8, patch_size=8, hidden_size=8, num_hidden_layers=0,
                  num_attention_heads=1, intermediate_size=8)


def text_encoder_model(cfg: dict, dtype=jnp.float32, vision_cfg: dict | None = None):
    """Our CLIP for a `CLIPTextModelWithProjection` config and, when given, the vision config of
    the image encoder (`read_image_encoder`); without it the vision tower is a placeholder with
    no weights (only `encode_text` is used)."""
    full = {"text_config": cfg, "projection_dim": cfg["projection_dim"],
            "vision_config": vision_cfg or _NO_VISION}
    return clip_import.model_from_hf_config(full, dtype)


def convert_text_encoder(comp: dict, dtype=jnp.float32):
    """(CLIP, text params, manifest): clip_import's tensor map, text tower only."""
    model = text_encoder_model(comp["config"], dtype)
    tensors = {k: v for k, v in comp["tensors"].items()
               if k != "text_model.embeddings.position_ids"}   # a buffer in older exports
    params = _clip_tower(model, tensors, ("text_model", "text_projection"), "text_encoder")
    # CLIP's setup creates its temperature on every method; Karlo has none and never uses it.
    params["logit_scale"] = jnp.asarray(model.logit_scale_init, jnp.float32)
    manifest = [(n, list(np.shape(v))) for n, v in sorted(tensors.items())]
    return model, params, manifest


def _clip_tower(model, tensors: dict, keys: tuple, where: str) -> dict:
    """Our params under `keys` (one tower and its projection) from HF CLIP tensors."""
    from flax import linen as nn
    from flax.traverse_util import flatten_dict

    tok = jnp.zeros((1, int(model.text["ctx"])), jnp.int32)
    size = int(model.vision["image_size"])
    img = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), img, tok))
    expected = {k: v for k, v in flatten_dict(nn.meta.unbox(shapes)["params"]).items()
                if k[0] in keys}
    mapping = {k: v for k, v in clip_import.param_map(model).items() if k in expected}
    return clip_import.map_tensors(expected, mapping, tensors, f"karlo {where}")


# ---------------------------------------------------------------------------- image encoder
VISION_CLASSES = ("CLIPVisionModelWithProjection", "CLIPModel")


def read_image_encoder(path: str) -> dict:
    """The CLIP vision tower (for variations and evaluation) from `path`: Karlo's image-variations
    release (an UnCLIPImageVariationPipeline folder: its image_encoder/ and feature_extractor/),
    a `CLIPVisionModelWithProjection` folder, or a Hugging Face `CLIPModel` folder (its vision
    tower). {"dir", "config" (HF vision config + projection_dim), "tensors" (vision tower and
    projection only), "preprocessor" (dict or None)}; `KarloFormatError` names what is wrong."""
    if not os.path.isdir(path):
        raise KarloFormatError(f"karlo: image encoder {path!r} is not a directory")
    pre_dir = path
    index = os.path.join(path, "model_index.json")
    if os.path.exists(index):   # a diffusers pipeline folder: its image_encoder/
        with open(index) as f:
            idx = json.load(f)
        enc = os.path.join(path, "image_encoder")
        if "image_encoder" not in idx or not os.path.isdir(enc):
            raise KarloFormatError(f"karlo: {path!r} is a {idx.get('_class_name')!r} folder "
                                   "without image_encoder/ (Karlo's image-variations release, "
                                   "karlo-v1-alpha-image-variations, has one)")
        pre_dir = os.path.join(path, "feature_extractor")
        path = enc
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise KarloFormatError(f"karlo: image encoder: {cfg_file} is missing")
    with open(cfg_file) as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in VISION_CLASSES:
        raise KarloFormatError(f"karlo: {cfg_file} describes a {arch!r}; the image encoder must "
                               f"be one of {VISION_CLASSES}")
    vision = dict(cfg["vision_config"] if arch == "CLIPModel" else cfg)
    vision["projection_dim"] = int(cfg["projection_dim"])
    try:
        tensors = clip_import.read_safetensors(path)
    except FileNotFoundError as e:
        raise KarloFormatError(f"karlo: image encoder: {e}") from None
    tensors = {k: v for k, v in tensors.items() if k.startswith(("vision_model.",
               "visual_projection.")) and k != "vision_model.embeddings.position_ids"}
    pre = None
    pre_file = os.path.join(pre_dir, "preprocessor_config.json")
    if os.path.exists(pre_file):
        with open(pre_file) as f:
            pre = json.load(f)
    return {"dir": path, "config": vision, "tensors": tensors, "preprocessor": pre,
            "preprocessor_file": pre_file if pre is not None else None}


def convert_image_encoder(comp: dict, text_cfg: dict, dtype=jnp.float32):
    """(CLIP with both towers, vision params, manifest). The projection must match the text
    encoder's (the prior and decoder take both towers' embeddings), and the preprocessing, when
    the folder has one, must be CLIP's (our `to_clip_pixels` and a bicubic resize)."""
    from unclip_jax.models.clip import CLIP_MEAN, CLIP_STD

    vis = comp["config"]
    if int(vis["projection_dim"]) != int(text_cfg["projection_dim"]):
        raise KarloFormatError(f"karlo: image encoder {comp['dir']}: projection_dim "
                               f"{vis['projection_dim']} != the text encoder's "
                               f"{text_cfg['projection_dim']} (not the same CLIP)")
    pre = comp.get("preprocessor")
    if pre is not None:
        for k, want in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if k in pre and not np.allclose(pre[k], want, atol=1e-6):
                raise KarloFormatError(f"karlo: {comp['preprocessor_file']}: {k}={pre[k]} is "
                                       f"not CLIP's {want.tolist()}")
        crop = pre.get("crop_size")
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if crop is not None and int(crop) != int(vis["image_size"]):
            raise KarloFormatError(f"karlo: {comp['preprocessor_file']}: crop_size {crop} != "
                                   f"the model's image_size {vis['image_size']}")
    model = text_encoder_model(text_cfg, dtype, vis)
    params = _clip_tower(model, comp["tensors"], ("vision_model", "visual_projection"),
                         "image_encoder")
    manifest = [(n, list(np.shape(v))) for n, v in sorted(comp["tensors"].items())]
    return model, params, manifest


# -------------------------------------------------------------------------------- schedulers
def scheduler_settings(cfg: dict, where: str) -> dict:
    """An UnCLIPScheduler config -> our sampler's arguments (method="ddpm", "karloN" spacing)."""
    _require(cfg, where, beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
    var = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}
    pred = {"epsilon": "eps", "sample": "x0"}
    vt, pt = cfg.get("variance_type", "fixed_small_log"), cfg.get("prediction_type", "epsilon")
    if vt not in var or pt not in pred:
        raise KarloFormatError(f"karlo: {where}: variance_type {vt!r} / prediction_type {pt!r} "
                               "not supported")
    clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
    return {"var_type": var[vt], "parameterization": pred[pt], "clip_x0": clip,
            "num_timesteps": int(cfg.get("num_train_timesteps", 1000)), "schedule": "cosine"}


# ------------------------------------------------------------------- Karlo's full architecture
def karlo_v1_alpha() -> dict:
    """kakaobrain/karlo-v1-alpha's architecture as a converted workdir's karlo.json holds it
    ({"configs": the components' config.json, "schedulers": our sampler's settings}), from
    diffusers' conversion script (scripts/convert_kakao_brain_unclip_to_diffusers.py): for plans
    and benchmarks at the real sizes without the weights (`karlo.abstract_params`)."""
    unet = dict(layers_per_block=3, block_out_channels=[320, 640, 960, 1280],
                norm_num_groups=32)
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3
    up = ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]
    sr = dict(unet, _class_name="UNet2DModel", sample_size=256, in_channels=6, out_channels=3,
              add_attention=False, down_block_types=["ResnetDownsampleBlock2D"] * 4,
              up_block_types=["ResnetUpsampleBlock2D"] * 4)
    configs = {
        "prior": dict(_class_name="PriorTransformer", num_attention_heads=32,
                      attention_head_dim=64, num_layers=20, embedding_dim=768,
                      num_embeddings=77, additional_embeddings=4),
        "text_proj": dict(_class_name="UnCLIPTextProjModel", clip_extra_context_tokens=4,
                          clip_embeddings_dim=768, time_embed_dim=1280,
                          cross_attention_dim=1536),
        "decoder": dict(unet, _class_name="UNet2DConditionModel", sample_size=64,
                        in_channels=3, out_channels=6, cross_attention_dim=1536,
                        down_block_types=down, up_block_types=up,
                        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                        class_embed_type="identity", attention_head_dim=64,
                        resnet_time_scale_shift="scale_shift"),
        "super_res_first": sr, "super_res_last": dict(sr),
        "text_encoder": dict(architectures=["CLIPTextModelWithProjection"], vocab_size=49408,
                             hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77,
                             projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5),
    }
    sched = {"prior": dict(variance_type="fixed_small_log", prediction_type="sample",
                           clip_sample_range=5.0),
             "decoder": dict(variance_type="learned_range", prediction_type="epsilon"),
             "super_res": dict(variance_type="fixed_small_log", prediction_type="epsilon")}
    return {"configs": configs,
            "schedulers": {k: scheduler_settings(dict(v, beta_schedule="squaredcos_cap_v2",
                                                      num_train_timesteps=1000), k)
                           for k, v in sched.items()}}
