"""Caption accuracy of generated shapes images, judged from pixels by `data.shapes_eval`.

Single-object prompts ("a red circle ..."): the dominant object (`shapes_eval.classify`) must have
the prompt's colour / shape / both. Two-object prompts ("a red circle and a blue square"):
binding is correct when every named (colour, shape) pair is seen as one object
(`shapes_eval.analyse`), so a blue circle + red square for "a red circle and a blue square"
fails even though both colours and both shapes appear. Size, position, relation and background
are not scored here (`shapes_eval.caption_errors` checks them on clean images).
Images: [N, H, W, 3] uint8 or float in [-1, 1], any size the classifier handles (32 or 64).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from unclip_jax.data import shapes, shapes_eval


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def shapes_accuracy(images, prompts: Sequence[str]) -> dict:
    """Counts and accuracies; prompts outside the shapes grammar are counted as "unparsed".

    `shape_confusion[asked][read]` counts single-object samples by the shape asked for and the
    shape read from the pixels ("none": no object found), which tells a decoder that draws
    blobs (everything read as circles) from one that draws the wrong shapes."""
    if len(images) != len(prompts):
        raise ValueError(f"shapes_accuracy: {len(images)} images but {len(prompts)} prompts")
    c = dict(single=0, colour=0, shape=0, both=0, two=0, binding=0, objects_named=0,
             objects_found=0, unparsed=0)
    confusion = {a: {r: 0 for r in shapes.SHAPES + ("none",)} for a in shapes.SHAPES}
    for image, prompt in zip(images, prompts):
        try:
            parsed = shapes_eval.parse_caption(prompt)
        except ValueError:
            c["unparsed"] += 1
            continue
        objs = parsed["objects"]
        if len(objs) == 1:
            seen = shapes_eval.classify(np.asarray(image))
            ok_c = seen["colour"] == objs[0]["colour"]
            ok_s = seen["shape"] == objs[0]["shape"]
            c["single"] += 1
            c["colour"] += ok_c
            c["shape"] += ok_s
            c["both"] += ok_c and ok_s
            confusion[objs[0]["shape"]][seen["shape"] or "none"] += 1
        else:
            seen = {(o["colour"], o["shape"])
                    for o in shapes_eval.analyse(np.asarray(image))["objects"]}
            found = sum((o["colour"], o["shape"]) in seen for o in objs)
            c["two"] += 1
            c["objects_named"] += len(objs)
            c["objects_found"] += found
            c["binding"] += found == len(objs)
    return from_counts(c, confusion)


def from_counts(c: dict, confusion: dict) -> dict:
    """The result dict from the raw counts (keys without "_count") and the confusion counts."""
    return {**{f"{k}_count": int(v) for k, v in c.items()},
            "colour_acc": _ratio(c["colour"], c["single"]),
            "shape_acc": _ratio(c["shape"], c["single"]),
            "both_acc": _ratio(c["both"], c["single"]),
            "binding_acc": _ratio(c["binding"], c["two"]),
            "object_acc": _ratio(c["objects_found"], c["objects_named"]),
            "shape_confusion": confusion}


def flat_counts(parts: Sequence[dict]) -> dict[str, int]:
    """`shapes_accuracy` results summed: "<name>_count" and "shape_confusion/<asked>/<read>" ->
    count. Seeded with the all-zero result, so the keys and their order are the same for any
    parts (also none): processes sum these rows element by element."""
    counts: dict[str, int] = {}
    for p in [shapes_accuracy([], []), *parts]:
        for k, v in p.items():
            if k.endswith("_count"):
                counts[k] = counts.get(k, 0) + int(v)
        for asked, row in p.get("shape_confusion", {}).items():
            for read, n in row.items():
                key = f"shape_confusion/{asked}/{read}"
                counts[key] = counts.get(key, 0) + int(n)
    return counts


def from_flat_counts(counts: dict[str, int]) -> dict:
    """The `shapes_accuracy` result of `flat_counts` (ratios from the sums)."""
    counts, confusion = dict(counts), {}
    for k in [k for k in counts if k.startswith("shape_confusion/")]:
        _, asked, read = k.split("/")
        confusion.setdefault(asked, {})[read] = counts.pop(k)
    return from_counts({k[:-len("_count")]: v for k, v in counts.items()}, confusion)


def merge(parts: Sequence[dict]) -> dict:
    """One `shapes_accuracy` result from the results of batches (equal to the check of all
    their images at once)."""
    return from_flat_counts(flat_counts(parts))
