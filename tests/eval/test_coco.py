"""Zero-shot MS-COCO protocol: the caption draw and the evaluation config."""
import json

import numpy as np
import pytest

from unclip_jax.eval import coco

from experiments.eval import coco_zero_shot


def _config(arg=None):
    return coco_zero_shot.get_config(arg)


def test_draw_one_random_caption_per_distinct_image():
    caps = [[f"img{i} cap{j}" for j in range(5)] for i in range(1000)]
    draw = coco.draw_captions(caps, num_samples=300, seed=0)
    assert len(draw) == 300 and len({i for i, _ in draw}) == 300        # distinct images
    assert all(c.startswith(f"img{i} ") for i, c in draw)                # its own caption
    assert draw == coco.draw_captions(caps, num_samples=300, seed=0)     # fixed seed
    assert draw != coco.draw_captions(caps, num_samples=300, seed=1)
    # the caption index is random, not always the first
    js = np.array([int(c[-1]) for _, c in draw])
    assert set(js) == set(range(5)) and abs(js.mean() - 2) < 0.4
    with pytest.raises(ValueError, match="1001 samples asked from 1000 images"):
        coco.draw_captions(caps, num_samples=1001)


def test_caption_sources(tmp_path):
    rec = {"captions": {"text": np.array([b"A cat.", b" A dog "], object), "id": np.array([1, 2])}}
    assert coco.caption_texts(rec) == ["A cat.", "A dog"]
    with pytest.raises(KeyError, match="captions"):
        coco.caption_texts({"image": b""})
    lines = [{"file": "a.jpg", "captions": ["x", "y"]}, {"file": "b.jpg", "caption": "z"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert coco.read_folder_captions(str(tmp_path)) == [("a.jpg", ["x", "y"]), ("b.jpg", ["z"])]
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        coco.read_folder_captions(str(tmp_path / "none"))


def test_config_describes_the_paper_protocol():
    c = _config()
    assert c.protocol.num_samples == 30_000 and c.protocol.resolution == 256
    assert c.data.name == "tfds" and c.data.tfds_name == "coco_captions"
    assert c.data.resolution == 256
    assert c.sampling.decoder_guidance == 1.25 and 1.25 in c.guidance_sweep
    assert list(c.guidance_sweep) == sorted(c.guidance_sweep) and len(c.guidance_sweep) >= 5
    assert "inception_weights" in c and "reference_stats" in c
    assert _config("folder").data.name == "folder"
    assert _config("smoke").protocol.num_samples < 1000
    with pytest.raises(ValueError, match="unknown variant"):
        _config("nope")
