"""CLIP score and CLIP-space Frechet distance with a tiny CLIP trained here on solid colours."""
import jax
import numpy as np
import optax
import pytest

from unclip_jax.eval import metrics as M
from unclip_jax.models.clip import CLIP, clip_loss

COLOURS = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]],
                   np.float32) * 0.8          # red, green, blue, yellow, magenta, cyan in [-1, 1]
EOS = len(COLOURS) + 2                        # highest id: CLIPText pools at the argmax token


def _pairs(rng, n):
    """Solid-colour 16x16 images with pixel noise, and captions [a, <colour>, eos, pad]."""
    c = rng.integers(0, len(COLOURS), n)
    images = COLOURS[c][:, None, None, :] + 0.15 * rng.standard_normal((n, 16, 16, 3))
    tokens = np.zeros((n, 4), np.int32)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 1, 2 + c, EOS
    return np.clip(images, -1, 1).astype(np.float32), tokens, c


@pytest.fixture(scope="module")
def trained_clip():
    model = CLIP(16, dict(vocab_size=EOS + 1, ctx=4, width=32, depth=1, heads=2, mlp_dim=64),
                 dict(image_size=16, patch=8, width=32, depth=1, heads=2, mlp_dim=64))
    rng = np.random.default_rng(0)
    images, tokens, _ = _pairs(rng, 8)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens)["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, tokens):
        def loss_fn(p):
            return clip_loss(*model.apply({"params": p}, images, tokens))
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    for _ in range(200):
        images, tokens, _ = _pairs(rng, 32)
        params, opt, loss = step(params, opt, images, tokens)
    return model, params


def test_clip_score_higher_for_matching_pairs(trained_clip):
    model, params = trained_clip
    enc_i, enc_t = M.clip_encoders(model, params)
    images, tokens, colours = _pairs(np.random.default_rng(1), 96)
    matched = M.clip_score_images(images, tokens, enc_i, enc_t, batch_size=32)
    # shuffled captions, keeping the pairs whose caption names another colour than the image's
    perm = np.random.default_rng(2).permutation(96)
    keep = np.nonzero(colours[perm] != colours)[0][:64]
    images_s, tokens_s = images[keep], tokens[perm[keep]]
    shuffled = M.clip_score_images(images_s, tokens_s, enc_i, enc_t, batch_size=32)
    assert matched > 60 and matched > shuffled + 40, (matched, shuffled)
    # an untrained CLIP does not separate them: the gap comes from training
    raw = jax.jit(model.init)(jax.random.PRNGKey(5), images[:2], tokens[:2])["params"]
    ri, rt = M.clip_encoders(model, raw)
    gap_raw = (M.clip_score_images(images, tokens, ri, rt)
               - M.clip_score_images(images_s, tokens_s, ri, rt))
    assert abs(gap_raw) < 10, gap_raw


def test_clip_space_frechet_distance(trained_clip):
    """Same colour distribution -> small CLIP-FD; only red images -> large."""
    model, params = trained_clip
    enc_i, _ = M.clip_encoders(model, params)
    real, _, _ = _pairs(np.random.default_rng(3), 300)
    same, _, _ = _pairs(np.random.default_rng(4), 300)
    red, _, c = _pairs(np.random.default_rng(5), 900)
    red = red[c == 0][:100]
    e_real, e_same, e_red = (M.encode_in_batches(enc_i, x, 100) for x in (real, same, red))
    fd_same, fd_red = M.fid_from_features(e_real, e_same), M.fid_from_features(e_real, e_red)
    assert fd_red > 10 * fd_same and fd_red > 0.1, (fd_same, fd_red)
