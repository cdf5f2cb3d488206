"""Caption accuracy of generated shapes images, judged from pixels by `data.shapes_eval`.

Single-object prompts ("a red circle ..."): the dominant object (`shapes_eval.classify`) must have
the prompt's colour / shape / both. Shape is the strict check (the object against the ideal
circle, square and triangle fitted to it; a blob is no shape); `shape_fill_acc` / `both_fill_acc`
read shape from the fill ratio instead, which counts blobs as circles (kept for comparison).
Two-object prompts ("a red circle and a blue square"): binding is correct when every named
(colour, shape) pair is seen as one object (`shapes_eval.analyse`), so a blue circle + red square
for "a red circle and a blue square" fails even though both colours and both shapes appear.
Position words ("on the left", ...): honoured when the named object's box centre is nearest that
position's anchor (single-object prompts: the dominant object; two-object prompts: the object
seen with the named colour and shape, else with the named colour; none seen: not honoured).
Relations ("above", ...): honoured when both objects are seen with their colour and shape and
the relation holds between them (`shapes.relations`). Size and background are not scored here
(`shapes_eval.caption_errors` checks them on clean images).
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
    shape read from the pixels ("blob": an object that is no shape; "none": no object found),
    which tells a decoder that draws blobs from one that draws the wrong shapes."""
    if len(images) != len(prompts):
        raise ValueError(f"shapes_accuracy: {len(images)} images but {len(prompts)} prompts")
    c = dict(single=0, colour=0, shape=0, both=0, shape_fill=0, both_fill=0, two=0, binding=0,
             objects_named=0, objects_found=0, positions_named=0, positions_right=0,
             relations_named=0, relations_right=0, unparsed=0)
    confusion = {a: {r: 0 for r in shapes.SHAPES + ("blob", "none")} for a in shapes.SHAPES}
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
            ok_f = seen["shape_fill"] == objs[0]["shape"]
            c["single"] += 1
            c["colour"] += ok_c
            c["shape"] += ok_s
            c["both"] += ok_c and ok_s
            c["shape_fill"] += ok_f
            c["both_fill"] += ok_c and ok_f
            read = seen["shape"] or ("none" if seen["colour"] is None else "blob")
            confusion[objs[0]["shape"]][read] += 1
            matched = [seen if seen["colour"] is not None else None]
        else:
            found = shapes_eval.analyse(np.asarray(image))["objects"]
            matched = [_match(o, found) for o in objs]
            bound = [m is not None and (m["colour"], m["shape"]) == (o["colour"], o["shape"])
                     for o, m in zip(objs, matched)]
            c["two"] += 1
            c["objects_named"] += len(objs)
            c["objects_found"] += sum(bound)
            c["binding"] += all(bound)
            if parsed["relation"]:
                c["relations_named"] += 1
                c["relations_right"] += all(bound) and (
                    parsed["relation"] in shapes.relations(*matched))
        for o, m in zip(objs, matched):
            if o["position"]:
                c["positions_named"] += 1
                c["positions_right"] += m is not None and m["position"] == o["position"]
    return from_counts(c, confusion)


def _match(claim: dict, found: list[dict]) -> dict | None:
    """The seen object a named one refers to: same colour and shape, else the largest of the
    same colour, else None."""
    same = [o for o in found if (o["colour"], o["shape"]) == (claim["colour"], claim["shape"])]
    same = same or [o for o in found if o["colour"] == claim["colour"]]
    return max(same, key=lambda o: o["extent"]) if same else None


def from_counts(c: dict, confusion: dict) -> dict:
    """The result dict from the raw counts (keys without "_count") and the confusion counts."""
    return {**{f"{k}_count": int(v) for k, v in c.items()},
            "colour_acc": _ratio(c["colour"], c["single"]),
            "shape_acc": _ratio(c["shape"], c["single"]),
            "both_acc": _ratio(c["both"], c["single"]),
            "shape_fill_acc": _ratio(c["shape_fill"], c["single"]),
            "both_fill_acc": _ratio(c["both_fill"], c["single"]),
            "binding_acc": _ratio(c["binding"], c["two"]),
            "object_acc": _ratio(c["objects_found"], c["objects_named"]),
            "position_acc": _ratio(c["positions_right"], c["positions_named"]),
            "relation_acc": _ratio(c["relations_right"], c["relations_named"]),
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
