"""The main job with its workdir and data on object storage (gs://, a local GCS emulator): killed
mid-stage, resumed to the result of the uninterrupted run (the session's `tiny_run`, trained
locally with the same config), then `sample` and `evaluate` read it; the shapes dataset is
generated into the bucket once; nothing is written to a local folder named "gs:"."""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from etils import epath

from helpers.gcs import emulator
from helpers.trainer import ROOT

KILLED = "diffusion_prior"   # a stage in the middle of the order, cheap to train


@pytest.fixture(scope="module")
def bucket():
    with emulator() as b:
        yield b


def _objects(prefix: str) -> dict[str, str]:
    """{name: generation} of the emulator's objects under gs://BUCKET/prefix, asked of the server
    itself (no client cache): a rewritten object has a new generation."""
    host = os.environ["STORAGE_EMULATOR_HOST"]
    from helpers.gcs import BUCKET
    q = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}/o?{q}", timeout=10) as r:
        items = json.load(r).get("items", [])
    return {o["name"]: o["generation"] for o in items}


def _leaves(tree) -> list:
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _main_job(tmp_path, *args):
    env = dict(os.environ, UNCLIP_NO_PROGRESS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "helpers", "main_job.py"),
                           f"--config={ROOT}/experiments/shapes.py:smoke", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


@pytest.fixture(scope="module")
def gcs_run(tiny_run, bucket, tmp_path_factory):
    """The tiny main job on gs://: killed once KILLED's first checkpoint is committed, then the
    same command resumed to the end, data_dir in the bucket too. (workdir, the killed run's
    checkpoint-2 objects, the two processes' output, the local folder both ran in, the
    dataset's objects after each run).

    To save test time the killed run finds the CLIP finished and the resumed run the decoder and
    upsampler (tiny_run's, uploaded: trained through the same trainer, checkpointer and data
    readers as the priors), and the report skips its AR-prior and true-embedding rows."""
    from unclip_jax import paths
    cfg, local, _ = tiny_run
    cwd = tmp_path_factory.mktemp("gcs_cwd")
    wd = f"{bucket}/runs/shapes"
    args = [f"--workdir={wd}", f"--config.data.data_dir={bucket}/data",
            f"--config.stages.{KILLED}.train.ckpt_every=2", "--config.report.ar_prior=False",
            "--config.report.true_embedding=False"]
    paths.upload(os.path.join(local, "clip"), f"{wd}/clip")
    killed = _main_job(cwd, f"--kill_after={KILLED}:2", *args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    at_kill = _objects(f"runs/shapes/{KILLED}/checkpoints/")
    data_at_kill = _objects("data/")
    for stage in ("decoder", "upsampler"):
        paths.upload(os.path.join(local, stage), f"{wd}/{stage}")
    resumed = _main_job(cwd, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return (wd, at_kill, killed.stdout + killed.stderr, resumed.stdout + resumed.stderr, cwd,
            (data_at_kill, _objects("data/")))


def test_killed_stage_resumes_to_the_uninterrupted_result(gcs_run, tiny_run):
    from unclip_jax.train.checkpoint import load_trained
    wd, at_kill, first, second, *_ = gcs_run
    # Killed in KILLED after its checkpoint 2: the stages before it finished, no later one began.
    assert f"[{KILLED}] training" in first and "[ar_prior]" not in first
    assert {n.split("/")[4] for n in at_kill} == {"2"}
    assert "[clip] finished earlier" in second and "[embed] cache complete: skipped" in second
    assert "[ar_prior] training" in second and "[decoder] finished earlier" in second
    # The resume started from checkpoint 2 (left as it was), not from scratch.
    now = _objects(f"runs/shapes/{KILLED}/checkpoints/")
    assert {n: g for n, g in now.items() if n in at_kill} == at_kill
    assert {n.split("/")[4] for n in now} == {"2", "4"}
    local = os.path.join(tiny_run[1], KILLED)
    for ema in (False, True):
        a, b = load_trained(f"{wd}/{KILLED}", ema=ema), load_trained(local, ema=ema)
        assert a.step == b.step == 4
        assert len(_leaves(a.params)) == len(_leaves(b.params))
        for x, y in zip(*(_leaves(t.params) for t in (a, b))):
            np.testing.assert_array_equal(x, y)
    # Every later stage, the samples and the report equal the uninterrupted run's.
    report = json.loads(epath.Path(f"{wd}/report.json").read_text())
    want = json.loads(open(os.path.join(tiny_run[1], "report.json")).read())
    for key in ("stages", "accuracy", "prior_cosines"):
        assert report[key] == want[key], key
    assert (epath.Path(f"{wd}/samples/grid.png").read_bytes()
            == open(os.path.join(tiny_run[1], "samples", "grid.png"), "rb").read())


def test_shapes_data_is_generated_into_the_bucket_once(gcs_run, tiny_run, bucket):
    """The killed run generated the dataset (locally, then uploaded with its completion marker
    last); the resumed run and this process read the bucket's copy without generating again,
    and its records are the locally generated dataset's."""
    import tensorflow_datasets as tfds

    from unclip_jax import paths
    from unclip_jax.data import shapes_tfds
    *_, first, second, _, (data_at_kill, data_now) = gcs_run
    s = tiny_run[0].data.shapes
    name = shapes_tfds.config_for(s.num_train, s.num_test, s.seed, s.image_size).name
    version = f"data/unclip_shapes/{name}/{shapes_tfds.UnclipShapes.VERSION}/"
    assert {n.rsplit("/", 1)[0] + "/" for n in data_at_kill} == {version}
    assert version + ".complete" in data_at_kill
    assert data_now == data_at_kill   # no object rewritten by the resumed run
    assert first.count("downloaded and prepared") == 1 and "downloaded and prepared" not in second
    ours = shapes_tfds.builder(s.num_train, s.num_test, s.seed, s.image_size,
                               data_dir=f"{bucket}/data")
    # read from this process's local copy of the bucket's files (paths.local_dir)
    assert os.path.dirname(os.fspath(ours.data_dir)) == paths._mirror_dir()
    assert _objects("data/") == data_at_kill
    local = shapes_tfds.builder(s.num_train, s.num_test, s.seed, s.image_size,
                                data_dir=tiny_run[0].data.data_dir)
    for split, n in (("train", s.num_train), ("test", s.num_test)):
        a, b = (x.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
                for x in (ours, local))
        assert len(a) == len(b) == n
        for i in (0, n // 2, n - 1):
            assert a[i]["image"] == b[i]["image"] and a[i]["caption"] == b[i]["caption"]


def test_sample_and_evaluate_read_the_gcs_workdir(gcs_run, tiny_run, bucket, tmp_path,
                                                  monkeypatch):
    from PIL import Image

    from unclip_jax import evaluate, sample
    from unclip_jax.images import to_uint8
    wd, _, _, _, cwd, _ = gcs_run
    monkeypatch.chdir(tmp_path)
    # The main job's own `samples` step (experiments/shapes.py:smoke sample.*), from the gs://
    # workdir: the images of the uninterrupted local run's samples/grid.png.
    res = sample.run([f"--workdir={wd}", f"--out={bucket}/samples_out", "--prompt=a red circle",
                      "--prompt=a blue square", "--num=2", "--prior_steps=4",
                      "--decoder_steps=4", "--upsampler_steps=ddim3"])
    images = to_uint8(res["images"])
    grid = np.asarray(Image.open(os.path.join(tiny_run[1], "samples", "grid.png")))
    for k, img in enumerate(images):
        r, c = divmod(k, 2)
        np.testing.assert_array_equal(img, grid[r * 66 + 1:r * 66 + 65, c * 66 + 1:c * 66 + 65])
    out = epath.Path(f"{bucket}/samples_out")
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png",
                                                     "0003.png", "settings.json"]
    with (out / "0003.png").open("rb") as f:
        np.testing.assert_array_equal(np.asarray(Image.open(f)), images[3])
    assert json.loads((out / "settings.json").read_text())["workdir"] == wd

    # One device: 4 captions gain nothing from a mesh of the 8 fake ones (half the programs'
    # compile and run), and both evaluations run alike.
    ev = [f"--config={ROOT}/experiments/eval/shapes.py:smoke", "--config.protocol.num_samples=4",
          "--config.guidance_sweep=()", "--config.metrics.prior_ar=False",
          "--config.num_devices=1"]
    r = evaluate.run([f"--workdir={wd}", *ev], log=lambda s: None)
    q = evaluate.run([f"--workdir={tiny_run[1]}", f"--out={tmp_path / 'eval'}", *ev],
                     log=lambda s: None)
    assert r["out"] == f"{wd}/eval/shapes"
    same = lambda x: json.dumps(x, sort_keys=True)  # noqa: E731 - NaN equals NaN here
    assert same(r["metrics"]) == same(q["metrics"]) and same(r["prior"]) == same(q["prior"])
    written = json.loads(epath.Path(f"{wd}/eval/shapes/eval.json").read_text())
    assert same(written["metrics"]) == same(q["metrics"])
    with np.load(tmp_path / "eval" / "samples.npz") as a, \
            np.load(epath.Path(f"{wd}/eval/shapes/samples.npz").open("rb")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
    assert list((epath.Path(f"{wd}/eval/shapes") / "tensorboard").iterdir())
    # Nothing went to a local folder named after the URL, here or where the job ran.
    for top in (tmp_path, cwd):
        assert not [d for d, _, _ in os.walk(top) if os.path.basename(d) == "gs:"], top
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
