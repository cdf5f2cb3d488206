"""One process of a local multi-process run (tests/train/test_multiprocess.py starts several)."""
import json
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/, and the checkout the test session imports (not whichever copy pip installed).
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]

from unclip_jax.tools import host_malloc

host_malloc.set_cpu_flags()  # the flags the command-line tools run with
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("MP_LOCAL_DEVICES", "2")))

from unclip_jax import distributed  # noqa: E402


def _shapes_parts(pid):
    """This process's per-batch shapes_accuracy results: rendered scenes under right and wrong
    captions (one with a position word), a blank image ("none") and a two-object caption with a
    relation, so every kind of count is used (no accuracy is NaN)."""
    import numpy as np
    from unclip_jax.data import shapes
    from unclip_jax.eval.shapes_accuracy import shapes_accuracy
    rng = np.random.default_rng(10 + pid)
    nxt = {"circle": "square", "square": "triangle", "triangle": "circle"}
    parts = []
    for b in range(2 - pid):   # process 0: two batches, process 1: one
        scenes = [shapes.single_object_scene(rng, shapes.COLOUR_NAMES[(b + k) % 6],
                                             shapes.SHAPES[(pid + k) % 3]) for k in range(4)]
        images = [shapes.render(s, 64) for s in scenes]
        images += [np.full((64, 64, 3), 255, np.uint8), images[0]]
        o = [s["objects"][0] for s in scenes]
        prompts = [f"a {x['colour']} {x['shape'] if k % 2 else nxt[x['shape']]}"
                   + (" on the left" if k == 1 else "")      # a position word
                   for k, x in enumerate(o)]
        prompts += ["a red circle", "a red triangle above a blue circle"]
        parts.append(shapes_accuracy(np.stack(images), prompts))
    return parts


def merge_shapes_main(pid):
    """Merge the shapes counts over processes: once with each process's batches, once with
    process 1 holding none (it must still take part in the gather)."""
    from unclip_jax.eval.gather import merge_shapes as _merge_shapes
    parts = _shapes_parts(pid)
    merged = _merge_shapes(parts)
    merged_empty = _merge_shapes(parts if pid == 0 else [])
    print("RESULT " + json.dumps({"process": jax.process_index(), "parts": parts,
                                  "merged": merged, "merged_empty": merged_empty}), flush=True)


def ar_codec_main(cache_dir):
    """Fit the AR prior's codec from the embedding cache in `cache_dir` through the stage (each
    process streams its own shards; PCA statistics merged, bucket coordinates gathered)."""
    import ml_collections
    import numpy as np
    from unclip_jax.data import cache
    from unclip_jax.stages.ar_prior import get_codec
    c = ml_collections.ConfigDict(dict(
        data=dict(name="embed_cache", cache_dir=cache_dir),
        model=dict(embed_dim=int(os.environ["MP_DIM"]), pca_components=int(os.environ["MP_K"]),
                   num_buckets=int(os.environ["MP_BUCKETS"]),
                   codec_path=os.path.join(cache_dir, "codec.npz"))))
    codec = get_codec(c)
    z_i = cache.load_field(cache_dir, "train", "image_embedding")
    z_t = cache.load_field(cache_dir, "train", "text_embedding")
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "eigenvalues": codec.pca.eigenvalues.tolist(),
        "edges": codec.quantizer.edges.tolist(), "dot_edges": codec.dot_quantizer.edges.tolist(),
        "tokens": np.asarray(codec.encode(z_i, z_t)).tolist()}), flush=True)


def wds_index_main(shards_dir):
    """Open the training stream on unindexed webdataset shards (each process indexes its own
    share of them first); report the shards whose tar this process scanned and the example ids
    of its first local batch."""
    from unclip_jax.data import default_data_config, make_iterator, shard_index
    scanned, real_scan = [], shard_index.scan_tar

    def scan(path):
        scanned.append(os.path.basename(path))
        return real_scan(path)
    shard_index.scan_tar = scan
    c = default_data_config("webdataset")
    c.path, c.resolution, c.num_threads = os.path.join(shards_dir, "*.tar"), 8, 2
    it = make_iterator(c, split="train", process_index=jax.process_index(),
                       process_count=jax.process_count(), local_batch_size=4, seed=3)
    print("RESULT " + json.dumps({"scanned": sorted(scanned),
                                  "index": next(it)["index"].tolist()}), flush=True)


def shapes_gcs_main(data_dir):
    """Open the tiniest shapes dataset at an object-store data_dir (process 0 builds and uploads
    it, the others wait); report how often this process generated examples and uploaded, and a
    digest of every raw record of each split."""
    import hashlib
    from unclip_jax import paths
    from unclip_jax.data import default_data_config, shapes_tfds, sources
    calls = {"generated": 0, "uploads": 0}
    real_gen, real_upload = shapes_tfds.UnclipShapes._generate_examples, paths.upload

    def generate(self, split, n):
        calls["generated"] += 1
        return real_gen(self, split, n)

    def upload(local, url):
        calls["uploads"] += 1
        return real_upload(local, url)
    shapes_tfds.UnclipShapes._generate_examples = generate
    paths.upload = upload
    c = default_data_config("shapes")
    c.data_dir = data_dir
    c.shapes.num_train, c.shapes.num_test, c.shapes.image_size = 3, 2, 16
    out = {"process": jax.process_index(), **calls}
    for split in ("train", "test"):
        src = sources.open_source(c, split, 0, 1)
        recs = [src[i] for i in range(len(src))]
        out[split] = {"captions": [r["caption"] for r in recs], "sha1": hashlib.sha1(b"".join(
            bytes(r["image"]) + r["caption"].encode() for r in recs)).hexdigest()}
    out.update(calls)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    port, n, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n > 1:
        distributed.initialize(f"127.0.0.1:{port}", n, pid)
    if os.environ.get("MP_TASK") == "merge_shapes":
        return merge_shapes_main(pid)
    if os.environ.get("MP_TASK") == "ar_codec":
        return ar_codec_main(workdir)
    if os.environ.get("MP_TASK") == "shapes_gcs":
        return shapes_gcs_main(workdir)
    if os.environ.get("MP_TASK") == "wds_index":
        return wds_index_main(workdir)
    from unclip_jax.train.trainer import train  # the tasks above need none of the trainer
    from helpers.trainer import host_tree, toy_config
    over = {"mesh.data": -1}
    if int(os.environ.get("MP_SIGTERM_PROCESS", "-1")) == pid:  # a preemption notice on one host
        over["data.sigterm_at_step"] = int(os.environ["MP_SIGTERM_STEP"])
    if os.environ.get("MP_NUM_STEPS"):
        over["train.num_steps"] = int(os.environ["MP_NUM_STEPS"])
    seen = []  # example ids of each step's local batch (file data)
    if os.environ.get("MP_SHARDS"):  # the toy's examples from webdataset shards
        from unclip_jax.data import default_data_config
        from unclip_jax.stages import toy
        d = default_data_config("webdataset")
        d.path, d.num_threads = os.environ["MP_SHARDS"], 2
        over.update({f"data.{k}": d[k] for k in d})
        real_next = toy.ToyFileData.__next__

        def recording_next(self):
            batch = real_next(self)
            seen.append(self.ids.tolist())
            return batch
        toy.ToyFileData.__next__ = recording_next
    stop_at = int(os.environ.get("MP_STOP_AT", "0")) or None
    out = train(toy_config(**over), workdir, stop_at=stop_at)
    params = host_tree(out["state"].params)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "loss": out["metrics"]["loss"],
        "status": out["status"], "step": out["step"],
        "kernel_sum": float(params["up_0"]["kernel"].sum()),
        "resumed_from": out["resumed_from"], "examples": out["examples"], "ids": seen,
        "params": [x.ravel().tolist() for x in jax.tree.leaves(params)],
        "torch_imported": "torch" in sys.modules,   # by tensorboardX: seconds of CPU per job
    }), flush=True)


if __name__ == "__main__":
    main()
