"""CLIP model pieces: causal text mask, EOT pooling, contrastive loss vs numpy, tokenizer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.clip import CLIP, CLIPText, clip_loss
from unclip_jax.data.tokenizer import Tokenizer

TEXT = dict(vocab_size=50, ctx=12, width=32, depth=2, heads=4, mlp_dim=64)


def _text_model(**kw):
    m = CLIPText(**{**TEXT, **kw})
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 12)), jnp.int32)
    return m, m.init(jax.random.PRNGKey(0), tokens), tokens


def test_causal_mask_later_tokens_never_change_earlier_outputs():
    m, v, tokens = _text_model()
    _, seq = m.apply(v, tokens)
    changed = tokens.at[:, 7].set(45)
    _, seq2 = m.apply(v, changed)
    np.testing.assert_allclose(seq[:, :7], seq2[:, :7], atol=1e-6)
    assert float(jnp.abs(seq[:, 7:] - seq2[:, 7:]).max()) > 1e-3  # later positions do see it


def test_pooling_takes_highest_token_or_first_eos():
    m, v, tokens = _text_model()
    tokens = tokens.at[0, 5].set(49).at[1, 3].set(49)
    pooled, seq = m.apply(v, tokens)
    np.testing.assert_allclose(pooled, seq[jnp.arange(2), jnp.array([5, 3])], atol=0)
    m2 = CLIPText(**TEXT, eos_token_id=2)
    t2 = tokens.at[0, 9].set(2).at[1, 4].set(2).at[1, 8].set(2)
    pooled2, seq2 = m2.apply(v, t2)
    np.testing.assert_allclose(pooled2, seq2[jnp.arange(2), jnp.array([9, 4])], atol=0)


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 8)).astype(np.float32)
    b = rng.standard_normal((6, 8)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    loss, metrics = clip_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(jnp.float32(10.0)))
    logits = 10.0 * a @ b.T

    def xent(lg):
        lg = lg - lg.max(1, keepdims=True)
        return -np.mean(np.diag(lg) - np.log(np.exp(lg).sum(1)))
    np.testing.assert_allclose(loss, 0.5 * (xent(logits) + xent(logits.T)), rtol=1e-5)
    np.testing.assert_allclose(metrics["i2t_loss"], xent(logits), rtol=1e-5)


def test_clip_embeddings_are_unit_and_learnable_scale():
    text = dict(TEXT)
    vision = dict(image_size=16, patch=8, width=24, depth=1, heads=3, mlp_dim=48)
    m = CLIP(16, text, vision)
    img = jnp.zeros((3, 16, 16, 3))
    tok = jnp.ones((3, 12), jnp.int32)
    # Jitted: op by op, every primitive of init, apply and grad would compile on its own.
    v = jax.jit(m.init)(jax.random.key(0, impl="rbg"), img, tok)
    i, t, s = jax.jit(m.apply)(v, img + jnp.arange(3)[:, None, None, None] * 0.3, tok)
    np.testing.assert_allclose(jnp.linalg.norm(i, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(t, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(s, np.log(1 / 0.07), rtol=1e-6)
    params = nn.meta.unbox(v["params"])
    g = jax.jit(jax.grad(lambda p: clip_loss(*m.apply({"params": p}, img, tok))[0]))(params)
    assert abs(float(g["logit_scale"])) > 0  # the temperature is trained


CAPTIONS = ["a red square on the left", "a blue circle at the top", "a small green triangle",
            "two shapes: a red circle above a blue square"] * 5


def test_tokenizer_roundtrip_truncation_and_errors(tmp_path):
    tok = Tokenizer.train(CAPTIONS, vocab_size=120, context_length=8)
    tokens, mask = tok.encode(["a red square", "a red circle above a blue square on the left"])
    assert tokens.dtype == np.int32 and tokens.shape == (2, 8) and mask.dtype == bool
    assert tokens[0, 0] == tok.bos_id and mask[0].sum() == 5 and tokens[0, 4] == tok.eos_id
    assert (tokens[0, 5:] == tok.pad_id).all() and not mask[0, 5:].any()
    assert tok.decode(tokens[:1]) == ["a red square"]
    with pytest.warns(UserWarning, match="truncated"):
        t2, m2 = tok.encode(["a red circle above a blue square on the left"])
    assert m2.all() and t2[0, -1] == tok.eos_id
    with pytest.raises(ValueError, match="caption 1 is empty"):
        tok.encode(["a red square", "  "])
    tok.save(str(tmp_path / "tok"))
    back = Tokenizer.load(str(tmp_path / "tok"))
    np.testing.assert_array_equal(back.encode(["a blue circle"])[0], tok.encode(["a blue circle"])[0])
    assert back.vocab_size == tok.vocab_size and back.context_length == 8
