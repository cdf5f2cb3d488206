"""Tiny stand-in stage that exercises the trainer (sharding, resume, logging) in seconds.

Run:   python -m unclip_jax.main --config=experiments/toy.py --workdir=runs/toy
Mesh:  python -m unclip_jax.main --config=experiments/toy.py --workdir=runs/toy \
           --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2   (8 devices)
Reach: loss (MSE against a sin(teacher) target) falls from ~0.35 to below ~0.05 in 500 steps.
"""
from unclip_jax.configs import base_config


def get_config(arg=None):
    c = base_config()
    c.stage = "toy"
    c.model.update(width=16, hidden=32, depth=2, dropout=0.0)
    c.data.dim = 16
    c.data.poison_steps = ()
    c.data.sigterm_at_step = -1   # test hook: the iterator sends SIGTERM at this step
    c.train.update(batch_size=32, num_steps=500, log_every=50, ckpt_every=250)
    c.optim.update(lr=3e-3, warmup_steps=20, schedule="cosine", ema_decay=0.99)
    return c
