"""Paper-size prior configs: parameter counts from jax.eval_shape (nothing allocated)."""
import flax.linen as nn
import jax
import numpy as np
from helpers.trainer import load_config

from unclip_jax.stages import get_stage


def _count(name):
    c = load_config(f"paper/{name}.py")
    stage = get_stage(c.stage)
    stage.validate(c)
    model = stage.build_model(c)
    batch = stage.example_batch(c, 1)
    shapes = jax.eval_shape(lambda r: stage.init(model, r, batch), jax.random.PRNGKey(0))
    return c, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def test_diffusion_prior_paper_count():
    c, n = _count("diffusion_prior")
    w, d = c.model.width, c.model.depth
    blocks = 12 * w * w * d
    # the blocks dominate (plus biases/norms, positions, input/output projections)
    assert blocks < n < blocks * 1.02
    # ~1.2B: GLIDE's figure for this shape; the table rounds it to "1B" (see the config docstring)
    assert 1.1e9 < n < 1.3e9, n
    assert c.optim.b2 == 0.96 and c.optim.eps == 1e-6 and c.optim.lr == 1.1e-4


def test_ar_prior_paper_count():
    c, n = _count("ar_prior")
    m = c.model
    enc, dec = 12 * m.enc_width ** 2 * m.enc_depth, 12 * m.dec_width ** 2 * m.dec_depth
    assert enc + dec < n < (enc + dec) * 1.02
    assert 1.9e9 < n < 2.1e9, n          # text encoder ~1.21B + latent decoder ~0.80B
    assert 0.7e9 < dec < 0.9e9           # the table's "1B" matches the latent decoder alone
    assert m.dec_width // m.dec_heads == 64 and m.pca_components + 1 <= 384
