"""The evaluator's sampling pass: per batch of captions, everything the metrics need
(`sample_batch` -> `BatchOutput`), kept by a `Collected` accumulator and concatenated over
batches and processes by `gather` -> `Samples`."""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from unclip_jax.eval.sampling import pad_array, pad_rows, sample_images, sample_priors


class Clock:
    """Seconds per name, summed over `with clock("name"):` blocks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


@dataclasses.dataclass
class BatchOutput:
    captions: list[str]
    rows: dict[str, np.ndarray]           # per example: position, index, text_embedding,
    #                                       true_image_embedding, prior_<name>, real_inception
    gen_clip: dict[float, np.ndarray]     # CLIP z_i of the generated images, by guidance scale
    gen_inception: dict[float, np.ndarray]
    images: np.ndarray | None             # uint8, at the main scale
    shapes: dict | None                   # eval.shapes_accuracy of `images`
    seconds: dict[str, float]


def sample_batch(pipe, inception, plan, batch: dict, real_inception: bool) -> BatchOutput:
    """Embed the real images and captions, sample each prior and the images at every guidance
    scale (same seed at each: the sweep compares guidance, not noise draws), embed the images."""
    from unclip_jax.eval.shapes_accuracy import shapes_accuracy
    from unclip_jax.images import from_uint8
    caps, b = batch["caption"], len(batch["caption"])
    size = max(b, min(plan.batch_size, plan.num_samples))
    seed = plan.seed + int(batch["position"][0])  # positions are unique: one seed per batch
    clock = Clock()
    rows = {"position": np.asarray(batch["position"], np.int64),
            "index": np.asarray(batch["index"], np.int64)}
    with clock("clip_real"):
        rows["text_embedding"] = pipe.encode_text(pad_rows(caps, size))["text_embedding"][:b]
        rows["true_image_embedding"] = pipe.encode_images(pad_array(batch["image"], size))[:b]
    if real_inception:
        with clock("inception"):
            rows["real_inception"] = inception(batch["image"])
    with clock("prior_sampling"):
        for name, z in sample_priors(pipe, caps, seed=seed, settings=plan.settings,
                                     priors=plan.priors, size=size).items():
            rows[f"prior_{name}"] = z
    gen_clip, gen_inc, images = {}, {}, None
    for g in plan.scales:
        with clock("sampling"):
            imgs = sample_images(pipe, caps, seed=seed, size=size, settings=dataclasses.replace(
                plan.settings, decoder_guidance=g))
        with clock("clip_generated"):
            gen_clip[g] = pipe.encode_images(pad_array(from_uint8(imgs), size))[:b]
        if inception is not None:
            with clock("inception"):
                gen_inc[g] = inception(imgs)
        images = imgs if images is None else images
    return BatchOutput(list(caps), rows, gen_clip, gen_inc, images,
                       shapes_accuracy(images, caps) if plan.shapes else None, clock.seconds)


@dataclasses.dataclass
class Collected:
    """This process's batch outputs; images only as many as the grid takes unless all are
    kept (config.save_images), so a large evaluation doesn't hold every image."""
    keep_images: bool
    grid_images: int
    parts: list[BatchOutput] = dataclasses.field(default_factory=list)
    grid: list[np.ndarray] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    count: int = 0

    def add(self, out: BatchOutput):
        self.grid.extend(out.images[:max(self.grid_images - len(self.grid), 0)])
        self.parts.append(out if self.keep_images else dataclasses.replace(out, images=None))
        for k, v in out.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.count += len(out.captions)


@dataclasses.dataclass
class Samples:
    """Every process's outputs concatenated (process-major), on every process."""
    captions: list[str]
    rows: dict[str, np.ndarray]
    gen_clip: dict[float, np.ndarray]
    gen_inception: dict[float, np.ndarray]
    images: np.ndarray | None
    grid: np.ndarray | None
    shapes: dict | None

    @property
    def n(self) -> int:
        return len(self.captions)


def gather(c: Collected, plan) -> Samples:
    """Concatenate over batches and processes (a collective: every process calls it)."""
    from unclip_jax.eval.gather import allgather_rows, allgather_strings, merge_shapes
    parts = c.parts

    def cat(xs):
        return allgather_rows(np.concatenate(xs, 0))

    rows = {k: cat([p.rows[k] for p in parts]) for k in (parts[0].rows if parts else {})}
    gen_clip = {g: cat([p.gen_clip[g] for p in parts]) for g in plan.scales}
    gen_inc = ({g: cat([p.gen_inception[g] for p in parts]) for g in plan.scales}
               if parts and parts[0].gen_inception else {})
    return Samples(
        captions=allgather_strings([s for p in parts for s in p.captions]), rows=rows,
        gen_clip=gen_clip, gen_inception=gen_inc,
        images=cat([p.images for p in parts]) if plan.keep_images and parts else None,
        grid=allgather_rows(np.stack(c.grid)) if c.grid else None,
        shapes=merge_shapes([p.shapes for p in parts]) if plan.shapes else None)
