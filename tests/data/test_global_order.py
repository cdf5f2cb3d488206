"""The training stream's global order (unclip_jax.data.loader): global batch k is the same
examples in the same order for any process count, and a position written by one count resumes
exactly on another. Webdataset shards, an image folder and an embedding cache."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from unclip_jax import embed
from unclip_jax.data import default_data_config, make_iterator

G, STEPS = 8, 7          # global batch; 56 positions: the 21-example sets span 3 epochs
CORRUPT, NO_CAPTION = 6, 13


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _members(i):
    image = b"\x89PNG truncated" if i == CORRUPT else _png(i)
    out = [(f"{i:05d}.png", image)]
    if i != NO_CAPTION:
        out.append((f"{i:05d}.txt", f"caption {i}".encode()))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """21 examples in shards of 5 (the last holds 1); one corrupt image, one without caption."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(5):
        with tarfile.open(d / f"{s:03d}.tar", "w") as tar:
            for i in range(5 * s, min(5 * s + 5, 21)):
                for name, data in _members(i):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    c = default_data_config("webdataset")
    c.path, c.resolution, c.num_threads = str(d / "*.tar"), 8, 2
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")
    lines = []
    for i in range(21):
        (d / f"{i}.png").write_bytes(_members(i)[0][1])
        lines.append({"file": f"{i}.png", "caption": "" if i == NO_CAPTION else f"image {i}"})
    (d / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    c = default_data_config("folder")
    c.path, c.resolution, c.num_threads = str(d), 8, 2
    return c


class _Encoder:
    """Embeddings that name their example: the mean pixel and the caption's number."""

    def encode_images(self, images):
        return images.mean((1, 2))

    def encode_texts(self, captions):
        n = np.array([[float(c.split()[-1])] * 3 for c in captions], np.float32)
        return {"text_embedding": n, "tokens": n.astype(np.int32)}


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory, folder):
    """The folder embedded by 2 processes (rows: process 0's examples, then process 1's)."""
    out = str(tmp_path_factory.mktemp("cache"))
    for p in range(2):
        embed.write_cache(_Encoder(), folder, split="train", out_dir=out, process_index=p,
                          process_count=2, batch_size=4, shard_size=3)
    c = default_data_config("embed_cache")
    c.cache_dir, c.num_threads = out, 2
    return c


def _batches(c, processes, steps=STEPS, seek=None, seed=3):
    """Global batches [step][field]: the processes' local batches concatenated in order; each
    process's stats."""
    per, stats = [], []
    for p in range(processes):
        it = make_iterator(c, split="train", process_index=p, process_count=processes,
                           local_batch_size=G // processes, seed=seed)
        if seek is not None:
            it.seek(seek, processes)
        per.append([next(it) for _ in range(steps)])
        stats.append(it.stats())
    out = [{k: np.concatenate([per[p][s][k] for p in range(processes)]) for k in per[0][s]}
           for s in range(steps)]
    return out, stats


@pytest.mark.parametrize("reader", ["shards", "folder", "embed_cache"])
def test_global_batches_do_not_depend_on_the_process_count(reader, request):
    c = request.getfixturevalue(reader)
    one, one_stats = _batches(c, 1)
    ids = np.concatenate([b["index"] for b in one])
    if reader == "shards":  # example ids are (shard << 32) | position in the shard
        ids = (ids >> 32) * 5 + (ids & 0xFFFFFFFF)
    usable = set(range(21)) - {CORRUPT, NO_CAPTION}
    n = len(usable) if reader == "embed_cache" else 21  # the cache holds the usable ones only
    for e in range(len(ids) // n):  # each epoch: every usable example, a new order
        epoch = ids[e * n:(e + 1) * n]
        assert set(epoch) == usable
        assert e == 0 or not np.array_equal(epoch, ids[:n])
    for processes in (2, 4):
        many, stats = _batches(c, processes)
        for a, b in zip(one, many):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        for key in ("skipped_corrupt", "skipped_no_caption"):  # each skip counted once
            assert sum(s[key] for s in stats) == one_stats[0][key]
        assert all(s["epoch"] == one_stats[0]["epoch"] == STEPS * G / n for s in stats)
    if reader != "embed_cache":
        # Two whole epochs and part of a third: each unusable example skipped 2 or 3 times.
        assert 2 <= one_stats[0]["skipped_corrupt"] <= 3
        assert 2 <= one_stats[0]["skipped_no_caption"] <= 3


@pytest.mark.parametrize("reader", ["shards", "embed_cache"])
def test_a_position_resumes_exactly_on_another_process_count(reader, request):
    c = request.getfixturevalue(reader)
    ref, _ = _batches(c, 1, steps=6)
    # Written by 4 processes after 3 steps (position 24), resumed on 2 and on 1.
    writer = [make_iterator(c, split="train", process_index=p, process_count=4,
                            local_batch_size=G // 4, seed=3) for p in range(4)]
    for it in writer:
        for _ in range(3):
            next(it)
    state = writer[0].get_state()
    assert state["position"] == 3 * G and all(w.get_state()["position"] == 24 for w in writer)
    for processes in (2, 1):
        resumed, _ = _batches(c, processes, steps=3, seek=state["position"])
        for a, b in zip(ref[3:], resumed):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # A state written before the global order (grain's index and counters) resumes at the job's
    # position: this process's examples times the count.
    legacy = make_iterator(c, split="train", process_index=0, process_count=2,
                           local_batch_size=G // 2, seed=3)
    legacy.set_state({"grain": {"next_index": 12}, "counts": {"examples": 3 * G // 2}})
    np.testing.assert_array_equal(next(legacy)["index"], ref[3]["index"][:G // 2])
    # The same count takes its own state back (JSON round trip, as in a checkpoint).
    fresh = make_iterator(c, split="train", process_index=1, process_count=4,
                          local_batch_size=G // 4, seed=3)
    fresh.set_state(json.loads(json.dumps(writer[1].get_state())))
    got, want = next(fresh), next(writer[1])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_two_processes_index_each_shard_once(shards, tmp_path):
    """Two processes start the training stream on shards never indexed: each scans only its own
    share of the tars (shards 0, 2, 4 and 1, 3), none twice, and together they read the
    one-process global batch."""
    import glob
    import os
    import shutil

    from helpers.processes import run_workers
    for tar in glob.glob(os.path.join(os.path.dirname(shards.path), "*.tar")):
        shutil.copy(tar, tmp_path)   # the tars alone: the fixture's may be indexed already
    runs = run_workers(2, 1, str(tmp_path), MP_TASK="wds_index")
    assert [r["scanned"] for r in runs] == [["000.tar", "002.tar", "004.tar"],
                                            ["001.tar", "003.tar"]]
    one = make_iterator(shards, split="train", process_index=0, process_count=1,
                        local_batch_size=G, seed=3)
    assert runs[0]["index"] + runs[1]["index"] == next(one)["index"].tolist()
