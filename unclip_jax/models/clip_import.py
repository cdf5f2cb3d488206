"""Import a pretrained Hugging Face CLIP checkpoint directory into our Flax `CLIP`.

    model, params, tokenizer = load_hf_clip("/path/to/clip-vit-h-14")   # config.json,
                                   # model.safetensors, vocab.json, merges.txt, tokenizer configs
    out = model.apply({"params": params}, images_in_minus1_1, method=model.encode_image)

Weights are read with the safetensors numpy API (no torch). Every parameter of our model must be
found with the right shape: a missing tensor raises KeyError and a mis-shaped one ValueError,
both naming the Hugging Face tensor. Images are mapped from our [-1, 1] to CLIP's normalisation
inside `CLIP.encode_image` (`clip.to_clip_pixels`), nowhere else.

`encoder(config)` is an `unclip_jax.embed` encoder factory (config.embed.clip_dir).

An imported CLIP as a run's CLIP stage (what `Pipeline`, `sample`, `evaluate` and the
manipulations load): the stage directory (`<workdir>/clip/`) holds `hf_clip.json`,
{"hf_dir": "/abs/path/to/the/HF/folder"} (or "gs://bucket/folder"), instead of `checkpoints/`;
`link_clip_stage` writes it after `check_hf_clip_dir`, `load_clip_stage` loads it as a
`train.checkpoint.Trained` (step 0) with the folder's own tokenizer (77 tokens and CLIP's pad id
for OpenAI's checkpoints).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.clip import CLIP
from unclip_jax.data.tokenizer import Tokenizer


def model_from_hf_config(cfg: dict, dtype=jnp.float32) -> CLIP:
    t, v = cfg["text_config"], cfg["vision_config"]
    eos = int(t.get("eos_token_id", 2))
    text = dict(vocab_size=int(t["vocab_size"]), ctx=int(t["max_position_embeddings"]),
                width=int(t["hidden_size"]), depth=int(t["num_hidden_layers"]),
                heads=int(t["num_attention_heads"]), mlp_dim=int(t["intermediate_size"]),
                eos_token_id=-1 if eos == 2 else eos,  # HF: eos id 2 means legacy argmax pooling
                act=t.get("hidden_act", "quick_gelu"), eps=float(t.get("layer_norm_eps", 1e-5)))
    if int(v.get("num_channels", 3)) != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']}: only RGB is supported")
    vision = dict(image_size=int(v["image_size"]), patch=int(v["patch_size"]),
                  width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]),
                  heads=int(v["num_attention_heads"]), mlp_dim=int(v["intermediate_size"]),
                  act=v.get("hidden_act", "quick_gelu"), eps=float(v.get("layer_norm_eps", 1e-5)))
    return CLIP(int(cfg["projection_dim"]), text, vision,
                logit_scale_init=float(cfg.get("logit_scale_init_value", 2.6592)), dtype=dtype)


def _linear(name):
    return [(f"{name}.weight", lambda w: w.T), (f"{name}.bias", None)]


def _block_map(hf: str, heads: int) -> dict:
    """Our block params -> (HF tensor names, converter)."""
    def qkv_kernel(q, k, v):  # torch [out, in] x3 -> our fused [in, heads*(q,k,v)*head_dim]
        w = np.stack([q.T, k.T, v.T], 1)                      # [in, 3, W]
        d_in, _, width = w.shape
        w = w.reshape(d_in, 3, heads, width // heads).transpose(0, 2, 1, 3)
        return w.reshape(d_in, 3 * width)

    def qkv_bias(q, k, v):
        b = np.stack([q, k, v], 0).reshape(3, heads, -1).transpose(1, 0, 2)
        return b.reshape(-1)

    a = f"{hf}.self_attn"
    return {
        ("attn", "qkv", "Dense_0", "kernel"): ([f"{a}.{p}_proj.weight" for p in "qkv"], qkv_kernel),
        ("attn", "qkv", "Dense_0", "bias"): ([f"{a}.{p}_proj.bias" for p in "qkv"], qkv_bias),
        ("attn", "out", "Dense_0", "kernel"): ([f"{a}.out_proj.weight"], lambda w: w.T),
        ("attn", "out", "Dense_0", "bias"): ([f"{a}.out_proj.bias"], None),
        ("ln_1", "LayerNorm_0", "scale"): ([f"{hf}.layer_norm1.weight"], None),
        ("ln_1", "LayerNorm_0", "bias"): ([f"{hf}.layer_norm1.bias"], None),
        ("ln_2", "LayerNorm_0", "scale"): ([f"{hf}.layer_norm2.weight"], None),
        ("ln_2", "LayerNorm_0", "bias"): ([f"{hf}.layer_norm2.bias"], None),
        ("fc", "Dense_0", "kernel"): ([f"{hf}.mlp.fc1.weight"], lambda w: w.T),
        ("fc", "Dense_0", "bias"): ([f"{hf}.mlp.fc1.bias"], None),
        ("proj", "Dense_0", "kernel"): ([f"{hf}.mlp.fc2.weight"], lambda w: w.T),
        ("proj", "Dense_0", "bias"): ([f"{hf}.mlp.fc2.bias"], None),
    }


def _ln(ours: tuple, hf: str) -> dict:
    return {ours + ("LayerNorm_0", "scale"): ([f"{hf}.weight"], None),
            ours + ("LayerNorm_0", "bias"): ([f"{hf}.bias"], None)}


def param_map(model: CLIP) -> dict:
    """Flattened param path -> ([HF tensor names], converter or None)."""
    t, v = model.text, model.vision
    m = {
        ("text_model", "token_embedding"): (["text_model.embeddings.token_embedding.weight"], None),
        ("text_model", "positional_embedding"):
            (["text_model.embeddings.position_embedding.weight"], None),
        ("vision_model", "class_embedding"): (["vision_model.embeddings.class_embedding"], None),
        ("vision_model", "positional_embedding"):
            (["vision_model.embeddings.position_embedding.weight"], None),
        ("vision_model", "patch_embed", "kernel"):  # torch OIHW -> flax HWIO
            (["vision_model.embeddings.patch_embedding.weight"], lambda w: w.transpose(2, 3, 1, 0)),
        ("text_projection", "Dense_0", "kernel"): (["text_projection.weight"], lambda w: w.T),
        ("visual_projection", "Dense_0", "kernel"): (["visual_projection.weight"], lambda w: w.T),
        ("logit_scale",): (["logit_scale"], lambda w: np.reshape(w, ())),
    }
    m.update(_ln(("text_model", "ln_final"), "text_model.final_layer_norm"))
    m.update(_ln(("vision_model", "ln_pre"), "vision_model.pre_layrnorm"))
    m.update(_ln(("vision_model", "ln_post"), "vision_model.post_layernorm"))
    for tower, cfg in (("text_model", t), ("vision_model", v)):
        for i in range(int(cfg["depth"])):
            for k, val in _block_map(f"{tower}.encoder.layers.{i}", int(cfg["heads"])).items():
                m[(tower, "transformer", f"block_{i}") + k] = val
    return m


def convert_state_dict(model: CLIP, tensors: dict[str, np.ndarray]) -> dict:
    """HF tensors (name -> numpy) -> our params tree; errors name the offending HF tensor."""
    from flax.traverse_util import flatten_dict
    from flax import linen as nn

    t = model.text
    dummy_tok = jnp.zeros((1, int(t["ctx"])), jnp.int32)
    size = int(model.vision["image_size"])
    dummy_img = jnp.zeros((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_img, dummy_tok))
    return map_tensors(flatten_dict(nn.meta.unbox(shapes)["params"]), param_map(model), tensors)


def map_tensors(expected: dict, mapping: dict, tensors: dict[str, np.ndarray],
                who: str = "clip_import") -> dict:
    """Our params tree from checkpoint tensors: `expected` maps each flattened param path to its
    shape/dtype, `mapping` the path to ([tensor names], converter or None). A missing tensor
    raises KeyError and a mis-shaped one ValueError, both naming the tensor."""
    from flax.traverse_util import unflatten_dict

    unmapped = set(expected) - set(mapping)
    if unmapped:
        raise RuntimeError(f"{who}: no mapping for our params {sorted(unmapped)[:5]}")
    out = {}
    for path, spec in expected.items():
        names, conv = mapping[path]
        arrays = []
        for n in names:
            if n not in tensors:
                raise KeyError(f"{who}: tensor {n!r} missing from the checkpoint "
                               f"(needed for {'/'.join(path)})")
            arrays.append(np.asarray(tensors[n], np.float32))
        shapes = [a.shape for a in arrays]
        bad = [n for n, s in zip(names, shapes) if shapes.count(s) == 1] if len(set(shapes)) > 1 \
            else names  # q/k/v must agree: the odd one out is the bad tensor
        value = None
        if conv is not None and len(set(shapes)) == 1:
            try:
                value = conv(*arrays)
            except ValueError:   # e.g. a reshape that the tensor's size does not allow
                value = None
        elif conv is None:
            value = arrays[0]
        if value is None or tuple(value.shape) != tuple(spec.shape):
            got = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
            raise ValueError(f"{who}: tensor {' / '.join(map(repr, bad))} has the wrong "
                             f"shape (got {got}); {'/'.join(path)} needs {tuple(spec.shape)} "
                             "after conversion")
        out[path] = jnp.asarray(value, spec.dtype)
    return unflatten_dict(out)


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory!r}")
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(directory, f)))
    return tensors


LINK_FILE = "hf_clip.json"   # in a run's clip/ stage directory: the imported HF folder
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def check_hf_clip_dir(directory: str) -> dict:
    """The folder's config.json after checking, without reading weights, that the folder (local
    or on object storage, gs://...) is a Hugging Face CLIP checkpoint: errors name the folder
    and the missing file or field."""
    from unclip_jax import paths
    where = f"Hugging Face CLIP folder {directory!r}"
    if not directory:
        raise ValueError("no Hugging Face CLIP folder given (empty path)")
    d = paths.path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{where} does not exist")
    path = d / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{where} has no config.json ({path})")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "clip" or not all(isinstance(cfg.get(k), dict)
                                 for k in ("text_config", "vision_config")):
        arch = cfg.get("architectures") if isinstance(cfg, dict) else None
        raise ValueError(f"{path} is not a CLIP model: model_type {kind!r}, architectures "
                         f"{arch!r} (expected model_type 'clip' with text_config and "
                         "vision_config, as transformers.CLIPModel saves it)")
    if "projection_dim" not in cfg:
        raise ValueError(f"{path} has no projection_dim")
    names = {f.name for f in d.iterdir() if not f.is_dir()}
    if not any(f.endswith(".safetensors") for f in names):
        raise FileNotFoundError(f"{where} has no *.safetensors weights (model.safetensors)")
    if not any(all(f in names for f in files) for files in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{where} has no tokenizer: expected vocab.json and merges.txt "
                                "(or tokenizer.json)")
    return cfg


def load_hf_clip(directory: str, dtype=jnp.float32):
    """(CLIP module, params, Tokenizer) from a HF CLIP directory the user names: a local path,
    or a folder on object storage read through a local copy (paths.local_dir: the weights and
    tokenizer readers take local files); nothing is downloaded from the Hub."""
    from unclip_jax import paths
    cfg = check_hf_clip_dir(directory)
    directory = paths.local_dir(directory)
    model = model_from_hf_config(cfg, dtype)
    params = convert_state_dict(model, read_safetensors(directory))
    tok = Tokenizer.from_hf(directory, context_length=int(model.text["ctx"]))
    return model, params, tok


class HFClipEncoder:
    """`unclip_jax.embed` encoder: images in [-1, 1] are resized to the model's size."""

    def __init__(self, directory: str):
        self.model, self.params, self.tokenizer = load_hf_clip(directory)
        size = int(self.model.vision["image_size"])

        def img(params, x):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic")
            return self.model.apply({"params": params}, x, method=CLIP.encode_image)["embedding"]

        def txt(params, tokens):
            return self.model.apply({"params": params}, tokens, method=CLIP.encode_text)
        self._img, self._txt = jax.jit(img), jax.jit(txt)

    def encode_images(self, images):
        return np.asarray(self._img(self.params, jnp.asarray(images)))

    def encode_texts(self, captions):
        tokens, _ = self.tokenizer.encode(captions)
        out = self._txt(self.params, jnp.asarray(tokens))
        return {"text_embedding": np.asarray(out["embedding"]), "tokens": tokens,
                "token_embeddings": np.asarray(out["token_encodings"])}


def encoder(config):
    return HFClipEncoder(str(config.embed.clip_dir))


# ------------------------------------------------------------------ an imported CLIP as a stage
def linked_hf_dir(stage_dir: str) -> str | None:
    """The HF folder a CLIP stage directory imports (its hf_clip.json), or None."""
    from unclip_jax import paths
    path = paths.path(stage_dir) / LINK_FILE
    if not path.is_file():
        return None
    try:
        hf_dir = json.loads(path.read_text())["hf_dir"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} must hold {{\"hf_dir\": \"/path/to/hf/clip\"}}") from None
    return str(hf_dir)


def link_clip_stage(stage_dir: str, hf_dir: str) -> None:
    """Make `stage_dir` a CLIP stage that imports the HF folder `hf_dir` (checked first).
    A stage directory already linked to another folder is an error, not silently re-pointed:
    the run's embedding cache and priors were made with the first one. Either may be a local
    path or on object storage (gs://...)."""
    from unclip_jax import paths
    hf_dir = str(paths.path(hf_dir))
    check_hf_clip_dir(hf_dir)
    old = linked_hf_dir(stage_dir)
    if old is not None:
        if str(paths.path(old)) != hf_dir:
            raise ValueError(f"{os.path.join(stage_dir, LINK_FILE)} imports {old}, not {hf_dir}: "
                             "this run's cache and stages were made with that CLIP; use a new "
                             "workdir for another")
        return
    if (paths.path(stage_dir) / "checkpoints").is_dir():
        raise ValueError(f"{stage_dir} holds a CLIP trained here (checkpoints/); it cannot also "
                         "import a Hugging Face CLIP")
    paths.write_text(os.path.join(stage_dir, LINK_FILE), json.dumps({"hf_dir": hf_dir}, indent=1))


def clip_stage_config(hf_dir: str, cfg: dict | None = None):
    """The config of an imported CLIP stage: the fields the pipeline and the recipes read
    (model sizes, tokenizer.dir = the HF folder, whose tokenizer files it uses)."""
    import ml_collections
    cfg = cfg or check_hf_clip_dir(hf_dir)
    t, v = cfg["text_config"], cfg["vision_config"]
    model = model_from_hf_config(cfg)
    return ml_collections.ConfigDict(dict(
        stage="clip", hf_dir=hf_dir, data=None,
        model=dict(embed_dim=int(cfg["projection_dim"]), image_size=int(v["image_size"]),
                   text_ctx=int(model.text["ctx"]), text_width=int(t["hidden_size"]),
                   resize="bicubic"),   # as CLIPImageProcessor resizes
        tokenizer=dict(dir=hf_dir)))


def load_clip_stage(stage_dir: str):
    """An imported CLIP stage (hf_clip.json) as a `Trained` (step 0, the HF weights)."""
    from unclip_jax import paths
    from unclip_jax.train.checkpoint import Trained
    hf_dir = linked_hf_dir(stage_dir)
    if hf_dir is None:
        raise FileNotFoundError(f"{stage_dir} has no {LINK_FILE}")
    try:
        model, params, _ = load_hf_clip(hf_dir)
    except (OSError, ValueError, KeyError) as e:
        raise type(e)(f"the CLIP stage {stage_dir} imports {hf_dir}: {e}") from None
    return Trained(clip_stage_config(hf_dir), None, model, params, 0, str(paths.path(stage_dir)))


def _hf_tensor_shapes(t: dict, v: dict, projection_dim: int) -> dict[str, tuple]:
    """Every tensor of a transformers `CLIPModel` checkpoint -> its shape."""
    shapes = {
        "text_model.embeddings.token_embedding.weight": (t["vocab_size"], t["width"]),
        "text_model.embeddings.position_embedding.weight": (t["ctx"], t["width"]),
        "vision_model.embeddings.class_embedding": (v["width"],),
        "vision_model.embeddings.patch_embedding.weight": (v["width"], 3, v["patch"], v["patch"]),
        "vision_model.embeddings.position_embedding.weight":
            ((v["image_size"] // v["patch"]) ** 2 + 1, v["width"]),
        "text_projection.weight": (projection_dim, t["width"]),
        "visual_projection.weight": (projection_dim, v["width"]),
        "logit_scale": (),
    }
    norms = {"text_model.final_layer_norm": t["width"], "vision_model.pre_layrnorm": v["width"],
             "vision_model.post_layernorm": v["width"]}
    for tower, c in (("text_model", t), ("vision_model", v)):
        w, m = c["width"], c["mlp_dim"]
        for i in range(c["depth"]):
            hf = f"{tower}.encoder.layers.{i}"
            for p in "qkv":
                shapes[f"{hf}.self_attn.{p}_proj.weight"] = (w, w)
                shapes[f"{hf}.self_attn.{p}_proj.bias"] = (w,)
            shapes[f"{hf}.self_attn.out_proj.weight"] = (w, w)
            shapes[f"{hf}.self_attn.out_proj.bias"] = (w,)
            shapes.update({f"{hf}.mlp.fc1.weight": (m, w), f"{hf}.mlp.fc1.bias": (m,),
                           f"{hf}.mlp.fc2.weight": (w, m), f"{hf}.mlp.fc2.bias": (w,)})
            norms.update({f"{hf}.layer_norm1": w, f"{hf}.layer_norm2": w})
    for name, w in norms.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (w,), (w,)
    return shapes


def _write_bpe_vocab(directory: str, words: Sequence[str]) -> None:
    """A byte-level CLIP vocabulary (every byte alone and word-final) plus merges that make each
    of `words` one token, so captions made of them stay short."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words if len(w) > 1):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = parts[0]
        for p in parts[1:]:
            if (prefix, p) not in merges:
                merges.append((prefix, p))
                vocab.append(prefix + p)
            prefix += p
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def write_random_hf_clip(directory: str, *, words: Sequence[str] = (), text_width: int = 32,
                         text_depth: int = 2, text_heads: int = 4, context_length: int = 77,
                         image_size: int = 32, patch: int = 8, vision_width: int = 24,
                         vision_depth: int = 2, vision_heads: int = 3, projection_dim: int = 16,
                         init_std: float = 0.02, seed: int = 0) -> None:
    """Write a random-weight CLIP in the Hugging Face layout (config.json, model.safetensors,
    tokenizer files), as `transformers.CLIPModel.save_pretrained` would, without torch.

    For smoke runs and tests that need "a pretrained HF CLIP" and may not download one; its
    embeddings mean nothing. `words` get single-token merges in the BPE vocabulary. `init_std`:
    the weights' scale (transformers' 0.02 gives image embeddings that hardly depend on the
    image; larger ones make them differ, which tests comparing embeddings need)."""
    import transformers
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    _write_bpe_vocab(directory, words)
    tok = transformers.CLIPTokenizer.from_pretrained(directory, model_max_length=context_length)
    tok.save_pretrained(directory)
    t = dict(vocab_size=len(tok), width=text_width, depth=text_depth, heads=text_heads,
             mlp_dim=4 * text_width, ctx=context_length)
    v = dict(image_size=image_size, patch=patch, width=vision_width, depth=vision_depth,
             heads=vision_heads, mlp_dim=4 * vision_width)
    transformers.CLIPConfig(
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=text_width,
                         intermediate_size=t["mlp_dim"], num_hidden_layers=text_depth,
                         num_attention_heads=text_heads, max_position_embeddings=context_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=vision_width, intermediate_size=v["mlp_dim"],
                           num_hidden_layers=vision_depth, num_attention_heads=vision_heads,
                           image_size=image_size, patch_size=patch),
        projection_dim=projection_dim, architectures=["CLIPModel"]).save_pretrained(directory)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in _hf_tensor_shapes(t, v, projection_dim).items():
        if name == "logit_scale":
            value = np.asarray(np.log(1 / 0.07))
        elif "norm" in name or "layrnorm" in name:  # affine around identity, as trained CLIPs
            value = float(name.endswith(".weight")) + 0.1 * rng.standard_normal(shape)
        else:
            value = init_std * rng.standard_normal(shape)
        tensors[name] = np.asarray(value, np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
