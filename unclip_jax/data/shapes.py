"""The captioned shapes world: scene sampling, rendering and captions (pure numpy / PIL).

A scene is a dict of attributes:
  {"background": "black", "objects": [{"shape": "circle", "colour": "red", "size": "large",
    "position": "left", "x": 0.22, "y": 0.5}, ...]}
`x`, `y` are the object's bounding-box centre as fractions of the image side; they are optional
in `render` (the position's anchor is used when absent), so a caption's attributes can be drawn
directly. The same functions generate the tfds dataset and evaluate generated samples.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUND_NAMES = tuple(BACKGROUNDS)
COLOUR_NAMES = tuple(COLOURS)

# Half the side of an object's bounding box, as a fraction of the image side. Sized so that the
# main job's 32x32 decoder draws shapes it can tell apart: at 0.11 / 0.2 (objects 7-13 px wide
# at 32 px) its shapes stayed at chance. Two large objects no longer fit apart by MIN_GAP, so a
# two-object scene has at most one large object.
HALF_EXTENT = {"small": 0.16, "large": 0.25}
ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
           "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}
JITTER = 0.03            # small enough that the position word stays true
MIN_GAP = 0.04           # bounding boxes of two objects are at least this far apart
RELATION_MARGIN = 0.12   # "above" etc. need the centres this far apart on that axis

POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the middle"),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: np.random.Generator) -> dict:
    """One random scene: a background and one or two non-overlapping objects."""
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    num_objects = int(rng.integers(1, 3))
    for _ in range(100):
        objects = [_sample_object(rng) for _ in range(num_objects)]
        if num_objects == 1 or _compatible(*objects):
            return {"background": background, "objects": objects}
    # Rejection failed (very unlikely): left and right small objects never overlap.
    objects = [dict(objects[0], size="small", position="left", x=ANCHORS["left"][0]),
               dict(objects[1], size="small", position="right", x=ANCHORS["right"][0])]
    for o in objects:
        o["y"] = 0.5
    return {"background": background, "objects": objects}


def single_object_scene(rng: np.random.Generator, colour: str, shape: str) -> dict:
    """A one-object scene of the given colour and shape; background, size and position drawn as
    in `sample_scene` (what a caption naming only colour and shape leaves open)."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}; expected one of "
                         f"{COLOUR_NAMES} / {SHAPES}")
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    return {"background": background, "objects": [dict(_sample_object(rng), colour=colour,
                                                       shape=shape)]}


def _sample_object(rng: np.random.Generator) -> dict:
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    ax, ay = ANCHORS[position]
    r = HALF_EXTENT[size]
    # Jitter, then keep the whole object inside the image.
    x = float(np.clip(ax + rng.uniform(-JITTER, JITTER), r + 0.01, 1 - r - 0.01))
    y = float(np.clip(ay + rng.uniform(-JITTER, JITTER), r + 0.01, 1 - r - 0.01))
    return {"shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
            "size": size, "position": position, "x": round(x, 4), "y": round(y, 4)}


def _compatible(a: dict, b: dict) -> bool:
    """Distinct positions, distinguishable objects, bounding boxes apart by MIN_GAP."""
    if a["position"] == b["position"] or (a["shape"], a["colour"]) == (b["shape"], b["colour"]):
        return False
    reach = HALF_EXTENT[a["size"]] + HALF_EXTENT[b["size"]] + MIN_GAP
    return abs(a["x"] - b["x"]) >= reach or abs(a["y"] - b["y"]) >= reach


def render(scene: dict, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Draw a scene as a [size, size, 3] uint8 image, antialiased by supersampling."""
    s = size * supersample
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        ax, ay = ANCHORS[obj["position"]]
        cx, cy = obj.get("x", ax) * s, obj.get("y", ay) * s
        r = HALF_EXTENT[obj["size"]] * s
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")
    # reduce() is a box filter: the average of each supersample x supersample block.
    return np.asarray(img.reduce(supersample) if supersample > 1 else img)


def relations(a: dict, b: dict) -> list[str]:
    """Spatial relations that hold from object a to object b (by bounding-box centres)."""
    ax, ay = a.get("x", ANCHORS[a["position"]][0]), a.get("y", ANCHORS[a["position"]][1])
    bx, by = b.get("x", ANCHORS[b["position"]][0]), b.get("y", ANCHORS[b["position"]][1])
    out = []
    if ay < by - RELATION_MARGIN:
        out.append("above")
    if ay > by + RELATION_MARGIN:
        out.append("below")
    if ax < bx - RELATION_MARGIN:
        out.append("to the left of")
    if ax > bx + RELATION_MARGIN:
        out.append("to the right of")
    return out


def _object_phrase(obj: dict, rng: np.random.Generator, *, with_size: bool,
                   with_position: bool) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    if with_position:
        options = POSITION_PHRASES[obj["position"]]
        phrase += " " + options[rng.integers(len(options))]
    return phrase


def caption(scene: dict, rng: np.random.Generator) -> str:
    """A caption that is true of the scene, from varied templates.

    Always names each object's colour and shape; sometimes its size, position, the background,
    or (for two objects) a spatial relation that holds between them.
    """
    objs = scene["objects"]
    if len(objs) == 1:
        text = _object_phrase(objs[0], rng, with_size=rng.random() < 0.5,
                              with_position=rng.random() < 0.5)
    else:
        a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        rels = relations(a, b)
        if rels and rng.random() < 0.6:
            rel = rels[rng.integers(len(rels))]
            text = (f"{_object_phrase(a, rng, with_size=rng.random() < 0.3, with_position=False)}"
                    f" {rel} "
                    f"{_object_phrase(b, rng, with_size=rng.random() < 0.3, with_position=False)}")
        else:
            pos = rng.random() < 0.3
            text = (f"{_object_phrase(a, rng, with_size=rng.random() < 0.3, with_position=pos)}"
                    f" and "
                    f"{_object_phrase(b, rng, with_size=rng.random() < 0.3, with_position=pos)}")
    if rng.random() < 0.35:
        text += f" on {_article(scene['background'])} {scene['background']} background"
    return text


# Split -> the seed component of its examples (the tfds builder and data.synthetic share it).
SPLIT_IDS = {"train": 0, "test": 1}


def example(seed: int, split_id: int, index: int, size: int = 64) -> tuple[dict, str, np.ndarray]:
    """The scene, caption and image of example `index`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, split_id, index])
    scene = sample_scene(rng)
    return scene, caption(scene, rng), render(scene, size)
