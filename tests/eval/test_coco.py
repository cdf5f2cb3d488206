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


def _coco_folder(root, n=12, size=20):
    """A folder in the `:folder` variant's documented layout: captions.jsonl lines
    {"file", "captions": [...]} (1-5 captions per image), PNG images beside it."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir()
    lines, pixels = [], []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"COCO_val2014_{i:012d}.png")
        pixels.append(img)
        lines.append({"file": f"COCO_val2014_{i:012d}.png",
                      "captions": [f"image {i} caption {j}" for j in range(1 + i % 5)]})
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines, pixels


def test_folder_variant_draws_captions_and_reads_images(tmp_path):
    from unclip_jax.data import preprocess, sources
    from unclip_jax.eval.dataset import eval_batches
    lines, pixels = _coco_folder(tmp_path / "val2014")
    c = _config("folder")
    c.data.path = str(tmp_path / "{split}")
    c.data.resolution = 16
    c.protocol.update(num_samples=9, caption_seed=3)
    assert c.protocol.order == "coco_draw"

    def drawn(pc, seed=3):
        c.protocol.caption_seed = seed
        rows = []
        for pi in range(pc):
            for b in eval_batches(c, c.data, 4, pi, pc):
                assert b["image"].shape == (len(b["caption"]), 16, 16, 3)
                rows += zip(b["position"].tolist(), b["index"].tolist(), b["caption"], b["image"])
        return sorted(rows, key=lambda r: r[0])

    one = drawn(1)
    want = coco.draw_captions([x["captions"] for x in lines], 9, seed=3)
    assert [(i, cap) for _, i, cap, _ in one] == want           # the documented draw
    assert [p for p, *_ in one] == list(range(9))
    for _, i, cap, img in one:                                  # each image is its file's
        assert cap in lines[i]["captions"]
        ref = preprocess.normalize(preprocess.resize_center_crop(pixels[i], 16))
        np.testing.assert_allclose(img, ref, atol=1e-6)
    two = drawn(2)                                              # same set over 2 processes
    assert [(p, i, cap) for p, i, cap, _ in two] == [(p, i, cap) for p, i, cap, _ in one]
    other = drawn(1, seed=4)
    assert [(i, cap) for _, i, cap, _ in other] != want
    # Several captions per image: the draw does not always take the first.
    assert any(cap != lines[i]["captions"][0] for _, i, cap, _ in one)
    # The training reader of the same folder takes each image's first caption.
    src = sources.FolderSource(str(tmp_path / "val2014"), 0, 1)
    assert [src[i]["caption"] for i in range(3)] == [x["captions"][0] for x in lines[:3]]


def test_folder_data_on_gcs_reads_as_the_local_folder(tmp_path):
    """The `:folder` data (captions.jsonl and images) on object storage (a local GCS emulator):
    the caption draw, its images and the training reader's examples equal the local folder's;
    a missing folder or image is named by its URL."""
    from helpers.gcs import emulator
    from unclip_jax import paths
    from unclip_jax.data import sources
    from unclip_jax.eval.dataset import eval_batches
    _coco_folder(tmp_path / "val2014")

    def batches(path, order):
        c = _config("folder")
        c.data.update(path=path, resolution=16)
        c.protocol.update(num_samples=7, caption_seed=3, order=order)
        return [b for pi in range(2) for b in eval_batches(c, c.data, 4, pi, 2)]

    local = {o: batches(str(tmp_path / "{split}"), o) for o in ("coco_draw", "first")}
    with emulator() as bucket:
        paths.upload(str(tmp_path / "val2014"), f"{bucket}/coco/val2014")
        for order, want in local.items():
            got = batches(f"{bucket}/coco/{{split}}", order)
            assert len(got) == len(want) == 2   # one batch per process
            for a, b in zip(got, want):
                assert a["caption"] == b["caption"]
                for k in ("image", "index", "position"):
                    np.testing.assert_array_equal(a[k], b[k])
        remote = sources.FolderSource(f"{bucket}/coco/val2014", 0, 1)
        want = (tmp_path / "val2014" / remote._entries[5]["file"]).read_bytes()
        assert remote[5]["image"] == want
        with pytest.raises(FileNotFoundError, match=f"{bucket}/coco/none"):
            coco.read_folder_captions(f"{bucket}/coco/none")
        with pytest.raises(FileNotFoundError, match=f"{bucket}/coco/none"):
            sources.FolderSource(f"{bucket}/coco/none", 0, 1)
        gone = f"{bucket}/coco/val2014/COCO_val2014_{local['coco_draw'][0]['index'][0]:012d}.png"
        paths.remove_tree(gone)   # a drawn image
        with pytest.raises(FileNotFoundError, match=gone):
            batches(f"{bucket}/coco/{{split}}", "coco_draw")
