"""CLIP import parity with transformers (a tiny random CLIPModel saved locally) and importer errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the `test` extra installs torch (CPU) for this file
import transformers

from helpers.clip_tokenizer import write_tiny_tokenizer
from unclip_jax.models import clip_import  # noqa: E402
from unclip_jax.models.clip import CLIP, to_clip_pixels  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_clip"))
    tok = write_tiny_tokenizer(d)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


def test_parity_with_transformers(hf_dir):
    d, hf, hf_tok = hf_dir
    model, params, tok = clip_import.load_hf_clip(d)
    captions = ["a red square", "red red circle on blue", "x"]
    tokens, mask = tok.encode(captions)
    ref_ids = hf_tok(captions, padding="max_length", max_length=16)["input_ids"]
    np.testing.assert_array_equal(tokens, np.array(ref_ids))

    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    ours_i = model.apply({"params": params}, jnp.asarray(images), method=CLIP.encode_image)
    ours_t = model.apply({"params": params}, jnp.asarray(tokens), method=CLIP.encode_text)
    pixels = torch.tensor(np.asarray(to_clip_pixels(images))).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_i = hf.get_image_features(pixel_values=pixels)
        ref_t = hf.get_text_features(input_ids=torch.tensor(tokens.astype(np.int64)),
                                     attention_mask=torch.tensor(mask.astype(np.int64)))
    ref_i = getattr(ref_i, "pooler_output", ref_i).numpy()
    ref_t = getattr(ref_t, "pooler_output", ref_t).numpy()
    np.testing.assert_allclose(ours_i["features"], ref_i, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours_t["features"], ref_t, atol=1e-4, rtol=1e-4)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(ours_i["embedding"], norm(ref_i), atol=1e-4)
    np.testing.assert_allclose(ours_t["embedding"], norm(ref_t), atol=1e-4)
    np.testing.assert_allclose(params["logit_scale"], hf.logit_scale.item(), rtol=1e-6)


def test_missing_tensor_is_named(hf_dir):
    d, _, _ = hf_dir
    with open(os.path.join(d, "config.json")) as f:
        model = clip_import.model_from_hf_config(json.load(f))
    tensors = clip_import.read_safetensors(d)
    name = "vision_model.encoder.layers.1.mlp.fc2.bias"
    del tensors[name]
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        clip_import.convert_state_dict(model, tensors)


def test_misshaped_tensor_is_named(hf_dir):
    d, _, _ = hf_dir
    with open(os.path.join(d, "config.json")) as f:
        model = clip_import.model_from_hf_config(json.load(f))
    tensors = clip_import.read_safetensors(d)
    name = "text_model.encoder.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:, :-1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        clip_import.convert_state_dict(model, tensors)


def test_random_hf_clip_is_the_transformers_layout(tmp_path):
    """write_random_hf_clip (no torch) writes what transformers' CLIPModel loads strictly."""
    d = str(tmp_path)
    clip_import.write_random_hf_clip(d, words=["red", "square"], context_length=12)
    hf, info = transformers.CLIPModel.from_pretrained(d, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tensors = clip_import.read_safetensors(d)
    assert set(tensors) == set(hf.state_dict()) - {k for k in hf.state_dict() if "position_ids" in k}
    tok = clip_import.Tokenizer.load(d)
    assert tok.context_length == 12
    tokens, _ = tok.encode(["red square"])
    assert tokens[0, :4].tolist() == [tok.bos_id, *transformers.CLIPTokenizer.from_pretrained(d)(
        "red square", add_special_tokens=False)["input_ids"], tok.eos_id]
    assert (tokens[0, 4:] == tok.pad_id).all()  # "red" and "square" are one token each
