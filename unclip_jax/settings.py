"""SampleSettings: the sampling choices of every stage, one hashable value (inference.Pipeline
and karlo.KarloPipeline compile one program per settings and batch shape)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Sampling choices per stage (hashable: one compiled program per settings and batch)."""
    prior: str = "diffusion"          # "diffusion" | "ar"
    prior_steps: str = "64"           # respacing of the diffusion prior (paper: 64)
    prior_method: str = "ddpm"
    prior_guidance: float = 1.0
    prior_var_type: str = "config"    # ddpm variance: the prior config's diffusion.var_type
                                      # (paper: "analytic"), or "fixed_small" | "fixed_large" |
                                      # "analytic" (needs the prior's analytic_variance.json)
    num_candidates: int = 2           # best-of-N by z_i . z_t (paper: 2)
    ar_temperature: float = 1.0
    ar_top_k: int = 0
    ar_guidance: float = 1.0
    ar_kv_cache: bool = True          # False: re-run the decoder per token (the reference path)
    decoder_steps: str = "50"         # paper: 250 strided steps with learned sigma
    decoder_method: str = "ddpm"      # "ddpm" (learned variance, as the paper) | "ddim"
    decoder_eta: float = 0.0          # DDIM only
    decoder_guidance: float = 3.0
    decoder_clip: bool = True         # clip x0 to [-1, 1] while sampling; off when decoding an
                                      # inverted x_T (the inversion has no clipping)
    upsampler_steps: str | tuple = "ddim15"  # one respacing for every upsampler, or one per
                                      # upsampler in chain order (paper: ("ddim27", "ddim15"))
    upsampler_eta: float = 0.0

    def __post_init__(self):
        if isinstance(self.upsampler_steps, list):   # hashable: settings key compiled programs
            object.__setattr__(self, "upsampler_steps", tuple(self.upsampler_steps))
        if self.prior not in ("diffusion", "ar"):
            raise ValueError(f"prior must be 'diffusion' or 'ar', got {self.prior!r}")
        for f in ("prior_method", "decoder_method"):
            if getattr(self, f) not in ("ddpm", "ddim"):
                raise ValueError(f"{f} must be 'ddpm' or 'ddim', got {getattr(self, f)!r}")
        if self.num_candidates < 1:
            raise ValueError("num_candidates must be >= 1")
        if self.prior_var_type not in ("config", "fixed_small", "fixed_large", "analytic"):
            raise ValueError("prior_var_type must be 'config', 'fixed_small', 'fixed_large' or "
                             f"'analytic', got {self.prior_var_type!r}")
        if self.prior_var_type == "analytic" and self.prior_method != "ddpm":
            raise ValueError("prior_var_type='analytic' is a variance of the ddpm sampler; "
                             f"prior_method is {self.prior_method!r}")
