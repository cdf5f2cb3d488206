"""The report's two-object and position rows (recipes/shapes._check_prompt_groups, _markdown)
on a stand-in pipeline that draws each caption, right or with the colours swapped: no training."""
import os

import ml_collections
import numpy as np
import pytest

from unclip_jax.data import preprocess, shapes, shapes_eval
from unclip_jax.inference import SampleSettings
from unclip_jax.recipes import shapes as recipe

BINDING = ("a red square and a green circle", "a blue triangle and a yellow circle")
POSITION = ("a large blue circle on the left", "a red square at the bottom",
            "a red circle on the left and a blue square on the right",
            "a green square above an orange triangle")


def _draw(caption, swap):
    """The scene a caption names (objects at their named positions, else left / right, or top /
    bottom for "above"), with the two objects' colours exchanged when `swap`."""
    p = shapes_eval.parse_caption(caption)
    objs = [dict(o, size=o["size"] or "small") for o in p["objects"]]
    default = ("top", "bottom") if p["relation"] in ("above",) else ("left", "right")
    for o, pos in zip(objs, default):
        o["position"] = o["position"] or pos
    if swap and len(objs) == 2:
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    return shapes.render({"background": "gray", "objects": objs}, 64)


class DrawPipe:
    def __init__(self, swap):
        self.swap = swap

    def text_to_image(self, prompts, *, seed, settings):
        return {"images": np.stack([preprocess.normalize(_draw(p, self.swap)) for p in prompts])}


@pytest.mark.parametrize("swap", [False, True])
def test_binding_and_position_rows(tmp_path, swap):
    r = ml_collections.ConfigDict(dict(per_prompt=2, seed=0, binding_prompts=BINDING,
                                       position_prompts=POSITION))
    timings = {}
    out = recipe._check_prompt_groups(DrawPipe(swap), r, SampleSettings(), str(tmp_path), timings)
    b, p = out["accuracy_binding"], out["accuracy_position"]
    assert b["two_count"] == 4 and p["positions_named_count"] == 8
    assert p["relations_named_count"] == 2
    assert os.path.exists(tmp_path / "report_grid_binding.png")
    assert "report_sampling_binding_position" in timings
    checks = out["prompt_checks"]
    assert list(checks) == list(BINDING + POSITION)
    if not swap:
        assert b["binding_acc"] == p["binding_acc"] == p["position_acc"] == 1.0
        assert p["relation_acc"] == 1.0 and checks[POSITION[0]]["both"] == 1.0
    else:   # every colour and shape is drawn, but paired the other way round
        assert b["binding_count"] == p["binding_count"] == p["relations_right_count"] == 0
        assert b["object_acc"] == 0.0
        assert checks[BINDING[0]] == {"both": None, "binding": 0.0, "position": None,
                                      "relation": None}
    md = recipe._markdown({"accuracy": out["accuracy_binding"], **out, "eval_prompts": [],
                           "per_prompt": 2, "stages": {}, "timings_s": {}, "settings": {}})
    want = "0.0%" if swap else "100.0%"
    assert f"| {BINDING[0]} |  | {want} |  |  |" in md
    assert f"| all |  | {want} |" in md


def test_prompt_outside_the_caption_grammar_is_an_error(tmp_path):
    r = ml_collections.ConfigDict(dict(per_prompt=1, seed=0, binding_prompts=("a red cat",),
                                       position_prompts=()))
    with pytest.raises(ValueError, match="not a shapes caption: 'a red cat'"):
        recipe._check_prompt_groups(DrawPipe(False), r, SampleSettings(), str(tmp_path), {})
