"""CPU speed check of the ADM U-Net train step against a PyTorch reference (2-core host).

Run:   python -m unclip_jax.tools.bench --config=experiments/bench/unet_cpu.py --steps=5
Target: a plain conv U-Net with channels 64,128,128, 2 res blocks, 32x32, batch 32, float32,
fwd+bwd+Adam; ours should be no slower than PyTorch's step (`python -m benchmarks.torch_unet`,
the same architecture and work) timed on the same host.

The model is the decoder stage's U-Net with both conditioning branches off (clip_dim=0,
text_depth=0), fixed variance (3 output channels) and NO attention: the PyTorch reference is a
plain convolutional U-Net, so attention (ADM's CIFAR default is 16,8) would time something
else. `--config=experiments/bench/unet_cpu.py:attn` adds attention at 16 and 8 for comparison.
The host's cores run the step data-parallel, one XLA device per core (mesh.cpu_devices=-1,
batch 16 per device on 2 cores), as PyTorch's step runs on both cores: no slower than one device
using both cores on the hosts measured. `--config.mesh.cpu_devices=0 --config.mesh.num_devices=1`
times the one-device step. Which framework is faster depends on the host, so compare on yours,
interleaved; dated figures are in docs/cpu-performance-2026-11.md.
"""
from unclip_jax.configs import base_config
from unclip_jax.data import default_data_config
from unclip_jax.models import decoder_model_config
from unclip_jax.stages.decoder import diffusion_config


def get_config(arg=None):
    c = base_config()
    c.stage = "decoder"
    c.model = decoder_model_config(
        dtype="float32", image_size=32, base_channels=64, channel_mult=(1, 2, 2),
        num_res_blocks=2, attention_resolutions=(16, 8) if arg == "attn" else (),
        head_channels=64, norm_groups=32, dropout=0.0, learn_sigma=False,
        clip_dim=0, text_depth=0, text_vocab=0, text_ctx=0)
    c.data = default_data_config("shapes")
    c.data.resolution = 32
    c.diffusion = diffusion_config(schedule="cosine", num_timesteps=1000, parameterization="eps")
    c.train.update(batch_size=32, num_steps=100)
    c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0)
    c.mesh.update(cpu_devices=-1, num_devices=0, data=-1, fsdp=1, tensor=1)
    return c
