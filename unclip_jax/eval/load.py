"""The trained run an evaluation samples from: stage directories, the mesh, the Pipeline."""
from __future__ import annotations

import os

from unclip_jax import paths
from unclip_jax.stages import UNCLIP_STAGES as STAGE_KEYS


def stage_dirs(config, workdir: str) -> dict | None:
    """Stage directories from config.stages overriding <workdir>/<stage>; None when nothing is
    overridden (then Pipeline.from_workdir, with its own messages, does the work)."""
    from unclip_jax.eval.plan import EvalError
    from unclip_jax.inference import is_clip_stage
    stages = config.stages
    given = {k: str(v) for k, v in (stages.items() if stages else []) if v}
    if not given:
        return None
    unknown = sorted(set(given) - set(STAGE_KEYS))
    if unknown:
        raise EvalError(f"config.stages has unknown keys {unknown}; use {list(STAGE_KEYS)}")
    out = {}
    for k in STAGE_KEYS:
        if k in given:
            dirs = [d.strip() for d in given[k].split(",") if d.strip()]
            for d in dirs:
                if k == "clip" and is_clip_stage(d):
                    continue   # trained here, or an imported HF CLIP (clip/hf_clip.json)
                if not (paths.path(d) / "checkpoints").is_dir():
                    raise FileNotFoundError(f"config.stages.{k}: {d} has no checkpoints/ "
                                            "(not a trained stage workdir)")
            out[k] = dirs if k == "upsampler" else dirs[0]
        elif (paths.path(workdir) / k / "checkpoints").is_dir() or (
                k == "clip" and is_clip_stage(os.path.join(workdir, k))):
            out[k] = [os.path.join(workdir, k)] if k == "upsampler" else os.path.join(workdir, k)
    for need in ("clip", "decoder"):
        if need not in out:
            raise FileNotFoundError(f"no trained '{need}' stage: set config.stages.{need} or use "
                                    f"a workdir with {need}/checkpoints ({workdir})")
    if "diffusion_prior" not in out and "ar_prior" not in out:
        raise FileNotFoundError("no trained prior: set config.stages.diffusion_prior or "
                                "config.stages.ar_prior, or use a workdir that has one")
    return out


def local_mesh(num_devices: int = 0):
    """A data mesh over this process's devices (each process samples its own captions), or
    None on one device. num_devices n > 0: its first n devices only. One process, all its
    devices: the same as inference.default_mesh()."""
    import jax

    from unclip_jax import parallel
    from unclip_jax.inference import default_mesh
    devices = jax.local_devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices} but this process has "
                         f"{len(devices)} devices")
    devices = devices[:num_devices or None]
    if len(devices) <= 1:
        return None
    if jax.process_count() == 1 and not num_devices:
        return default_mesh()
    return parallel.make_mesh({"data": -1}, devices=devices)


def config_mesh(config):
    """local_mesh for config.num_devices (0 or absent: every local device)."""
    return local_mesh(int(config.get("num_devices", 0) or 0))


def load_pipeline(config, workdir: str):
    from unclip_jax.inference import Pipeline
    dirs = stage_dirs(config, workdir)
    ema = bool(config.ema)
    if dirs is None:
        return Pipeline.from_workdir(workdir, ema=ema, mesh=config_mesh(config))
    return Pipeline.from_stage_dirs(clip=dirs["clip"], decoder=dirs["decoder"],
                                    prior=dirs.get("diffusion_prior"),
                                    ar_prior=dirs.get("ar_prior"),
                                    upsamplers=dirs.get("upsampler", []), ema=ema,
                                    mesh=config_mesh(config))


def output_resolution(pipe) -> int:
    last = pipe.upsamplers[-1] if pipe.upsamplers else pipe.decoder
    return int(last.config.model.image_size)


def checkpoint_steps(pipe) -> dict[str, int]:
    """The step of every loaded stage (eval.json's checkpoint_steps)."""
    steps = {name: int(t.step) for name, t in (
        ("clip", pipe.clip), ("diffusion_prior", pipe.prior), ("ar_prior", pipe.ar_prior),
        ("decoder", pipe.decoder)) if t is not None}
    for i, u in enumerate(pipe.upsamplers):
        steps["upsampler" if i == 0 else f"upsampler_{i + 1}"] = int(u.step)
    return steps
