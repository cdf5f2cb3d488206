"""The evaluation set: real images and captions, each process's share in batches."""
from __future__ import annotations

import hashlib
import json

import numpy as np


def data_config(config, pipe, resolution: int):
    """The evaluation data: config.data, or with data_source="run" the dataset the run's CLIP
    trained on (the main job gives every image stage the same source; for shapes that is the
    built-in dataset, whose test split is held out)."""
    if config.data_source == "run":
        if pipe.clip.config.get("data") is None:
            from unclip_jax.eval.plan import EvalError
            raise EvalError(f"data_source='run' but the run's CLIP ({pipe.clip.workdir}) is "
                            "imported, not trained on the run's data: set config.data")
        d = pipe.clip.config.data.copy_and_resolve_references()
    else:
        d = config.data.copy_and_resolve_references()
    with d.unlocked():
        d.resolution = int(resolution)
    return d


def eval_batches(config, dcfg, batch_size: int, pi: int, pc: int):
    """This process's share of the evaluation set in batches: {"caption": list[str], "image":
    float32 [b, R, R, 3] in [-1, 1], "index": example ids, "position": rows' positions in the
    global set (unique: they seed the sampling)}.

    order "first": the first num_samples examples of the split (process p reads global
    positions p, p + P, ...; same set for any process count); "shuffled": a seeded random
    subset; "coco_draw": eval.coco.draw_captions over a tfds split or a folder's
    captions.jsonl (distinct images, one random caption each, the paper's zero-shot protocol)."""
    p = config.protocol
    n, order = int(p.num_samples), p.order
    if order == "coco_draw":
        yield from _coco_draw_batches(config, dcfg, batch_size, pi, pc)
        return
    from unclip_jax.data import make_iterator
    quota = len(range(pi, n, pc))
    if quota == 0:
        return
    it = make_iterator(dcfg, split=str(p.split), process_index=pi, process_count=pc,
                       local_batch_size=batch_size, seed=int(p.caption_seed),
                       fields=("image", "caption", "index"), shuffle=order == "shuffled",
                       num_epochs=1, drop_remainder=False)
    done = 0
    for batch in it:
        take = min(len(batch["caption"]), quota - done)
        pos = pi + pc * np.arange(done, done + take)
        yield {"caption": [str(c) for c in batch["caption"][:take]],
               "image": np.asarray(batch["image"][:take], np.float32),
               "index": np.asarray(batch["index"][:take], np.int64), "position": pos}
        done += take
        if done >= quota:
            return


def _coco_draw_batches(config, dcfg, batch_size: int, pi: int, pc: int):
    import os

    from unclip_jax import paths
    from unclip_jax.data import preprocess, sources
    from unclip_jax.eval.coco import caption_texts, draw_captions, read_folder_captions
    from unclip_jax.eval.plan import EvalError
    split = str(config.protocol.split)
    if dcfg.name == "tfds":
        src = sources.open_source(dcfg, split, 0, 1)
        key = str(dcfg.caption_key)
        caps = [caption_texts(src.read(i)["_record"], key) for i in range(len(src))]

        def image(i):
            return src.read(i)["image"]
    elif dcfg.name == "folder":
        folder = sources._split_path(str(dcfg.path), split)
        entries = read_folder_captions(folder)
        caps = [c for _, c in entries]

        def image(i):
            f = os.path.join(folder, entries[i][0])
            try:
                return paths.path(f).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"image {f} listed in {folder}/captions.jsonl does "
                                        "not exist") from None
    else:
        raise EvalError("protocol.order='coco_draw' reads a tfds dataset (data.name='tfds') or "
                        "a folder whose captions.jsonl lists every caption of each image "
                        f"(data.name='folder'), not data.name={dcfg.name!r}")
    drawn = draw_captions(caps, int(config.protocol.num_samples),
                          int(config.protocol.caption_seed))
    mine = list(range(pi, len(drawn), pc))
    for s in range(0, len(mine), batch_size):
        rows = mine[s:s + batch_size]
        imgs = []
        for r in rows:
            img = preprocess.decode(image(drawn[r][0]))
            imgs.append(preprocess.resize_center_crop(img, int(dcfg.resolution)))
        yield {"caption": [drawn[r][1] for r in rows],
               "image": preprocess.normalize(np.stack(imgs)).astype(np.float32),
               "index": np.asarray([drawn[r][0] for r in rows], np.int64),
               "position": np.asarray(rows, np.int64)}


def eval_set_key(config, dcfg) -> str:
    """What identifies the real images (for reusing cached reference statistics)."""
    p = config.protocol
    desc = json.dumps({"data": dcfg.to_dict(), "split": str(p.split),
                       "num_samples": int(p.num_samples), "order": p.order,
                       "caption_seed": int(p.caption_seed)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]
