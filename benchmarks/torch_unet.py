"""PyTorch reference for the CPU speed check: the same ADM U-Net train step, timed in PyTorch.

  python -m benchmarks.torch_unet [--config=experiments/bench/unet_cpu.py] [--steps=5]
  python -m unclip_jax.tools.bench --config=experiments/bench/unet_cpu.py --steps=5   # ours, to compare

Builds the architecture of `config.model` (ADM U-Net: AdaGN res blocks, BigGAN up/down res
blocks, skip concatenation, zero-init outputs; no attention, no caption or CLIP branches) in
PyTorch and times fwd + bwd + AdamW + global-norm clipping + EMA on random data, as our
`bench` times the real train step, so both sides do the same work on the same architecture.
`tests/benchmarks/test_torch_unet.py` checks the two models have the same parameter count and give the
same output for the same weights. Needs torch (in the test extra); not used by the package.
"""
from __future__ import annotations

import json
import math
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/bench/unet_cpu.py",
                                          "U-Net config (decoder stage, no attention).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default).")
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", False, "NHWC memory format.")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")


def build(model_cfg):
    """torch nn.Module with our UNet's architecture (and parameter names' structure)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    m = model_cfg
    if tuple(m.attention_resolutions) or int(m.get("clip_dim", 0)) or int(m.get("text_depth", 0)):
        raise ValueError("bench_torch: the reference has no attention, CLIP or caption branch; "
                         "use a config with attention_resolutions=() clip_dim=0 text_depth=0")
    base, mult = int(m.base_channels), tuple(int(c) for c in m.channel_mult)
    groups, ed = int(m.norm_groups), 4 * int(m.base_channels)
    out_ch = int(m.get("out_channels", 3)) * (2 if m.get("learn_sigma", False) else 1)

    class Res(nn.Module):
        def __init__(self, cin, cout, resample=None):
            super().__init__()
            self.resample = resample
            self.norm_in = nn.GroupNorm(groups, cin, eps=1e-5)
            self.conv_in = nn.Conv2d(cin, cout, 3, padding=1)
            self.emb_proj = nn.Linear(ed, 2 * cout)
            self.norm_out = nn.GroupNorm(groups, cout, eps=1e-5)
            self.conv_out = nn.Conv2d(cout, cout, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, emb):
            h = F.silu(self.norm_in(x))
            if self.resample == "up":
                h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), \
                    F.interpolate(x, scale_factor=2.0, mode="nearest")
            elif self.resample == "down":
                h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
            h = self.conv_in(h)
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = F.silu(self.norm_out(h) * (1 + scale) + shift)
            h = self.conv_out(h)
            return (x if self.skip is None else self.skip(x)) + h

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_fc1, self.time_fc2 = nn.Linear(base, ed), nn.Linear(ed, ed)
            in_ch = int(m.get("in_channels", 3))
            self.conv_in = nn.Conv2d(in_ch, base * mult[0], 3, padding=1)
            self.down, skip_ch, ch = nn.ModuleList(), [base * mult[0]], base * mult[0]
            for level, mu in enumerate(mult):
                for _ in range(int(m.num_res_blocks)):
                    self.down.append(Res(ch, base * mu))
                    ch = base * mu
                    skip_ch.append(ch)
                if level != len(mult) - 1:
                    self.down.append(Res(ch, ch, "down"))
                    skip_ch.append(ch)
            self.mid = nn.ModuleList([Res(ch, ch), Res(ch, ch)])
            self.up = nn.ModuleList()
            for level, mu in reversed(list(enumerate(mult))):
                for _ in range(int(m.num_res_blocks) + 1):
                    self.up.append(Res(ch + skip_ch.pop(), base * mu))
                    ch = base * mu
                if level:
                    self.up.append(Res(ch, ch, "up"))
            self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
            self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

        def forward(self, x, t):
            half = base // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = t.float()[:, None] * freqs[None]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            emb = self.time_fc2(F.silu(self.time_fc1(emb)))
            h = self.conv_in(x)
            skips = [h]
            for blk in self.down:
                h = blk(h, emb)
                skips.append(h)
            for blk in self.mid:
                h = blk(h, emb)
            for blk in self.up:
                if blk.resample != "up":
                    h = torch.cat([h, skips.pop()], dim=1)
                h = blk(h, emb)
            return self.conv_out(F.silu(self.norm_out(h)))

    return UNet()


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def benchmark(config, *, steps: int = 5, warmup: int = 2, threads: int = 0,
              channels_last: bool = False) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(config.model)
    b, res = int(config.train.batch_size), int(config.model.image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=float(config.optim.lr),
                            betas=(float(config.optim.b1), float(config.optim.b2)),
                            eps=float(config.optim.eps),
                            weight_decay=float(config.optim.weight_decay))
    ema = [p.detach().clone() for p in model.parameters()]
    decay, clip = float(config.optim.ema_decay), float(config.optim.grad_clip)
    # Cosine-schedule q_sample, eps target: the decoder stage's loss at fixed variance.
    x0 = (torch.rand(b, 3, res, res) * 2 - 1).contiguous(memory_format=fmt)

    def step():
        t = torch.randint(0, 1000, (b,))
        ab = torch.cos((t.float() / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
        noise = torch.randn_like(x0)
        xt = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * noise
        loss = ((model(xt, t) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1.0 - decay)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(framework=f"torch {torch.__version__}", threads=torch.get_num_threads(),
                channels_last=channels_last, params=num_params(model), batch_size=b,
                step_time_s=statistics.median(times), step_times_s=times)


def main(argv):
    del argv
    r = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                  threads=_THREADS.value, channels_last=_CHANNELS_LAST.value)
    print(f"{r['framework']} ({r['threads']} threads, channels_last={r['channels_last']}): "
          f"{r['params'] / 1e6:.2f}M params, batch {r['batch_size']}, "
          f"median step {r['step_time_s']:.3f} s over {len(r['step_times_s'])} steps")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    app.run(main)
