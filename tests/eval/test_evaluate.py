"""The evaluator (unclip_jax.eval, run by the unclip_jax.evaluate CLI) on one tiny trained run:
eval.json against independent recomputations from the arrays it saves, the guidance sweep plot,
TensorBoard, and bad input."""
import json
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from unclip_jax import evaluate as cli
from unclip_jax.eval import evaluator as E
from unclip_jax.eval import metrics as M
from unclip_jax.eval.dataset import data_config, eval_set_key
from unclip_jax.eval.outputs import PLOT_FILE, load_reference
from unclip_jax.eval.plan import EvalError
from unclip_jax.images import from_uint8
from unclip_jax.eval.shapes_accuracy import shapes_accuracy
from unclip_jax.inference import Pipeline

from helpers.trainer import ROOT, load_config, snapshot

CFG = os.path.join(ROOT, "experiments", "eval", "shapes.py")
N = 24  # captions in the :smoke evaluation config


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run[1]


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_out") / "out")
    before = snapshot(run)
    # Record the decoder guidance of every sampling call (the tiny run's decoder barely reacts
    # to guidance after 4 steps, so the sweep's scales can't be told apart from the images).
    calls, load = [], E.load_pipeline

    def recording_load(config, workdir):
        pipe = load(config, workdir)
        t2i = pipe.text_to_image

        def text_to_image(prompts, **kw):
            calls.append((len(prompts), kw["settings"].decoder_guidance, kw["seed"]))
            return t2i(prompts, **kw)
        pipe.text_to_image = text_to_image
        return pipe

    E.load_pipeline = recording_load
    try:
        # Through the command line's flag parsing (config file + variant).
        res = cli.run(["--workdir", run, "--config", CFG + ":smoke", "--out", out],
                      log=lambda s: None)
    finally:
        E.load_pipeline = load
    after = snapshot(run)
    with np.load(os.path.join(out, "samples.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    return res, out, arrays, before == after, calls


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.from_workdir(run)


def _json(out):
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_eval_json_keys_and_values(evaluated):
    _, out, a, workdir_untouched, _ = evaluated
    j = _json(out)
    assert workdir_untouched  # --out elsewhere: the run is only read
    assert j["num_samples"] == N and j["step"] == 4 and j["checkpoint_steps"]["upsampler"] == 4
    assert j["data"] == {"name": "shapes", "split": "test", "resolution": 64, "order": "first"}
    assert j["settings"]["decoder_steps"] == "3" and j["settings"]["decoder_guidance"] == 3.0
    assert j["inception"] is None and "fid" not in j["metrics"]  # no weights configured
    assert j["warnings"] == []
    m = j["metrics"]
    assert m["pr_features"] == "clip" and m["pr_k"] == 3
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert 0.0 <= m["clip_score"] <= 100.0 and m["clip_fd"] > 0.0
    assert a["images"].shape == (N, 64, 64, 3) and a["images"].dtype == np.uint8
    for k in ("text_embedding", "true_image_embedding", "gen_clip", "prior_diffusion",
              "prior_ar"):
        assert a[k].shape == (N, 16), k
    assert sorted(a["position"].tolist()) == list(range(N))
    # Metrics equal a recomputation from the saved arrays.
    np.testing.assert_allclose(m["clip_fd"], M.fid_from_features(a["true_image_embedding"],
                                                                  a["gen_clip"]), rtol=1e-9)
    pr = M.precision_recall(a["true_image_embedding"], a["gen_clip"], k=3)
    assert (m["precision"], m["recall"]) == (pr["precision"], pr["recall"])


def test_prior_cosines_match_an_independent_recomputation(evaluated):
    _, out, a, _, _ = evaluated
    prior = _json(out)["prior"]
    assert set(prior) == {"diffusion", "ar"}  # the tiny run trains both priors
    base = _cos(a["text_embedding"], a["true_image_embedding"])
    for name in ("diffusion", "ar"):
        z = a[f"prior_{name}"]
        # Sampled, not copied: neither the true z_i nor z_t.
        assert np.abs(z - a["true_image_embedding"]).max() > 1e-3
        assert np.abs(z - a["text_embedding"]).max() > 1e-3
        cos = _cos(z, a["true_image_embedding"])
        r = prior[name]
        assert r["n"] == N
        np.testing.assert_allclose(r["cos_sample_true"], cos.mean(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["cos_text_true"], base.mean(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["gain"], cos.mean() - base.mean(), atol=1e-12)
        np.testing.assert_allclose(r["cos_sample_true_sem"], cos.std(ddof=1) / np.sqrt(N),
                                   rtol=1e-9)


def test_embeddings_are_the_runs_clip_on_the_test_split(evaluated, pipe, run):
    """gen_clip / text_embedding / true z_i come from the run's own CLIP, and the real images
    and captions are the first N of the shapes test split."""
    from unclip_jax.data import make_iterator
    _, out, a, _, _ = evaluated
    m = _json(out)["metrics"]
    gen = pipe.encode_images(from_uint8(a["images"]))
    np.testing.assert_allclose(gen, a["gen_clip"], atol=2e-5)
    text = pipe.encode_text(list(a["caption"]))["text_embedding"]
    np.testing.assert_allclose(text, a["text_embedding"], atol=2e-5)
    np.testing.assert_allclose(m["clip_score"], M.clip_score(gen, text), atol=1e-3)
    # CLIP score clamps at 0 (an untrained tiny decoder's noise can score 0 throughout), so
    # also the raw mean cosine, which is not clamped.
    np.testing.assert_allclose(m["clip_cosine"], _cos(gen, text).mean(), atol=1e-5)
    assert m["clip_cosine"] != m["clip_cosine_real"]
    np.testing.assert_allclose(m["clip_score_real"],
                               M.clip_score(a["true_image_embedding"], text), atol=1e-9)
    d = pipe.clip.config.data.copy_and_resolve_references()
    d.resolution = 64
    batch = next(make_iterator(d, split="test", process_index=0, process_count=1,
                               local_batch_size=N, seed=0, shuffle=False, num_epochs=1))
    order = np.argsort(a["position"])
    assert [str(c) for c in batch["caption"]] == [str(c) for c in a["caption"][order]]
    np.testing.assert_array_equal(batch["index"], a["index"][order])
    np.testing.assert_allclose(pipe.encode_images(batch["image"]),
                               a["true_image_embedding"][order], atol=2e-5)


def test_shapes_accuracy_counts_every_caption(evaluated):
    _, out, a, _, _ = evaluated
    acc = _json(out)["shapes_accuracy"]
    assert acc["single_count"] + acc["two_count"] + acc["unparsed_count"] == N
    assert acc["unparsed_count"] == 0 and acc["single_count"] > 0 and acc["two_count"] > 0
    # The same counts as the evaluator on the saved images (batching and merging lose nothing).
    ref = shapes_accuracy(a["images"], [str(c) for c in a["caption"]])
    for k, v in ref.items():
        np.testing.assert_equal(acc[k], v)


def test_guidance_sweep_writes_plot_and_one_entry_per_scale(evaluated):
    from PIL import Image
    _, out, a, _, calls = evaluated
    j = _json(out)
    sweep = j["guidance_sweep"]
    assert [e["guidance"] for e in sweep] == [1.0, 3.0] and j["sweep_metric"] == "clip_fd"
    # One batch of 24: sampled at the main scale 3.0, then again at 1.0 only, same seed.
    assert calls == [(N, 3.0, 0), (N, 1.0, 0)]
    # 3.0 is the main scale: its entry is the main evaluation's numbers (same samples).
    assert sweep[1]["clip_fd"] == j["metrics"]["clip_fd"]
    assert sweep[1]["clip_score"] == j["metrics"]["clip_score"]
    np.testing.assert_array_equal(a["gen_clip_g3"], a["gen_clip"])
    for e in sweep:
        g = a[f"gen_clip_g{e['guidance']:g}"]
        np.testing.assert_allclose(e["clip_fd"], M.fid_from_features(a["true_image_embedding"],
                                                                      g), rtol=1e-9)
        np.testing.assert_allclose(e["clip_score"], M.clip_score(g, a["text_embedding"]),
                                   atol=1e-9)
    img = np.asarray(Image.open(os.path.join(out, PLOT_FILE)).convert("RGB")).astype(int)
    assert img.shape == (440, 640, 3)
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() >= 2 * 30  # two drawn points (9x9 discs)
    # The "no Inception weights" note is drawn in dark red on the plot.
    note = (img[..., 0] > 120) & (img[..., 1] < 40) & (img[..., 2] < 40) & ~red
    assert note[:40].sum() > 50


def _tb_scalars(logdir):
    """(tag, step) -> value from tensorboardX event files (TFRecord of Event protos)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_tensorboard_has_the_metrics_at_the_checkpoint_step(evaluated):
    _, out, _, _, _ = evaluated
    j = _json(out)
    tb = _tb_scalars(os.path.join(out, "tensorboard"))
    np.testing.assert_allclose(tb[("eval/metrics/clip_fd", 4)], j["metrics"]["clip_fd"], rtol=1e-6)
    np.testing.assert_allclose(tb[("eval/prior/ar/gain", 4)], j["prior"]["ar"]["gain"], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(tb[("eval/sweep/clip_fd_g1", 4)],
                               j["guidance_sweep"][0]["clip_fd"], rtol=1e-6)


def test_fid_without_weights_file_is_one_line_exit_2(run, tmp_path):
    before = snapshot(run)
    missing = str(tmp_path / "nowhere" / "pt_inception.npz")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "unclip_jax.evaluate", f"--workdir={run}",
                        f"--config={CFG}:smoke", f"--config.inception_weights={missing}",
                        f"--out={out}"], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and missing in lines[0] and "nothing is downloaded" in lines[0]
    assert not out.exists() and snapshot(run) == before


def test_help_says_what_it_does_and_the_entry_imports_no_jax():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "unclip_jax.evaluate", "--help"],
                       capture_output=True, text=True, timeout=120, check=False, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("Evaluate a trained unCLIP run")
    for flag in ("--workdir", "--config", "--out", "--coordinator_address", "--num_processes",
                 "--process_id"):
        assert f"{flag}:" in p.stdout, flag
    # The entry module stays light: the allocator setup must run before JAX is imported.
    p = subprocess.run([sys.executable, "-c", "import sys, unclip_jax.evaluate; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))"],
                       capture_output=True, text=True, timeout=120, check=False, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]


def test_bad_flags_are_an_eval_error():
    with pytest.raises(EvalError, match="bad arguments"):
        cli.run(["--workdir=x", "--config", CFG + ":smoke", "--no_such_flag=1"])
    with pytest.raises(EvalError, match="--config and --workdir are required"):
        cli.run(["--config", CFG + ":smoke"])


def test_fid_requested_without_weights_configured(run, tmp_path):
    before = snapshot(run)
    # A --config.x=y override reaches the config.
    with pytest.raises(EvalError, match="inception_weights is empty"):
        cli.run(["--workdir", run, "--config", CFG + ":smoke", "--config.metrics.fid=true",
                 "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and snapshot(run) == before


def test_num_devices_picks_the_mesh():
    """config.num_devices: 0 every local device (8 here), n the first n, 1 no mesh; more than
    the process has is named."""
    import jax

    from unclip_jax.eval.load import config_mesh
    assert config_mesh(ml_collections.ConfigDict({"num_devices": 0})).devices.size == 8
    mesh = config_mesh(ml_collections.ConfigDict({"num_devices": 2}))
    assert list(mesh.devices.flat) == jax.local_devices()[:2]
    assert config_mesh(ml_collections.ConfigDict({"num_devices": 1})) is None
    with pytest.raises(ValueError, match="num_devices=9 but this process has 8 devices"):
        config_mesh(ml_collections.ConfigDict({"num_devices": 9}))


def test_bad_workdirs_and_empty_eval_set(run, tmp_path):
    import shutil
    before = snapshot(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        E.evaluate(_with(), str(tmp_path / "none"))
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(run, "clip"), partial / "clip")
    with pytest.raises(FileNotFoundError, match="no trained 'decoder' stage"):
        E.evaluate(_with(), str(partial))
    assert sorted(os.listdir(partial)) == ["clip"]  # no eval/ left behind
    with pytest.raises(EvalError, match=r"unknown fields \['decoder_guidence'\]"):
        E.evaluate(_with(sampling_extra=True), run, str(tmp_path / "o"))
    # A folder dataset whose images are all missing: every example is skipped -> empty set.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "captions.jsonl").write_text(
        '{"file": "a.png", "caption": "a red circle"}\n{"file": "b.png", "caption": "x"}\n')
    cfg = _with(folder=str(folder))
    with pytest.raises(EvalError, match="evaluation set is empty"):
        E.evaluate(cfg, run, str(tmp_path / "o"), log=lambda s: None)
    assert not (tmp_path / "o").exists() and snapshot(run) == before


def _with(folder=None, sampling_extra=False):
    from unclip_jax.data import default_data_config
    cfg = load_config(os.path.join("eval", "shapes.py"), "smoke")
    if sampling_extra:
        cfg.sampling.decoder_guidence = 2.0  # misspelt: must not be ignored
    if folder:
        cfg.data_source = "config"
        cfg.data = default_data_config("folder")
        cfg.data.path = folder
        cfg.data.num_threads = 0
        cfg.metrics.shapes_accuracy = "false"
    return cfg


def _random_inception_weights(path, seed=0):
    """A complete pytorch-fid-named state with random He-scaled convolutions (so pool3
    features are not degenerate) and identity BatchNorm: stands in for the real weights file,
    which is not available offline."""
    from unclip_jax.eval import inception_weights as IW
    from unclip_jax.eval.inception import param_shapes
    rng = np.random.default_rng(seed)
    state = {}
    for p, leaf in IW._conv_paths(IW._plain(param_shapes())):
        kh, kw, cin, cout = leaf["kernel"].shape
        name = ".".join(p)
        state[f"{name}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw))
                                        * np.sqrt(2.0 / (cin * kh * kw))).astype(np.float32)
        for f, v in (("weight", 1.0), ("running_var", 1.0), ("bias", 0.0),
                     ("running_mean", 0.0)):
            state[f"{name}.bn.{f}"] = np.full((cout,), v, np.float32)
    np.savez(path, **state)


def test_inception_fid_kid_and_reference_cache(run, pipe, tmp_path, monkeypatch):
    """With a weights file: FID / KID / precision-recall on Inception features, equal to a
    recomputation from the saved features; the real statistics are cached for re-runs."""
    from unclip_jax.eval import inception_weights as IW
    from unclip_jax.eval.inception import InceptionFeatures
    weights = str(tmp_path / "inception.npz")
    _random_inception_weights(weights)
    cfg = load_config(os.path.join("eval", "shapes.py"), "smoke")
    # 8 captions, no sweep: Inception at 299x299 runs ~0.3 s of CPU per image at the tests'
    # -O0, and 8 fill the 8 test devices' batch without padding rows (12 ran as 16). The
    # sampling runs at 8 too (min(batch size, captions)), a program of its own either way.
    cfg.protocol.num_samples = 8
    cfg.guidance_sweep = ()
    cfg.inception_weights = weights
    cfg.metrics.update(kid_subset_size=6, kid_subsets=5)
    out = str(tmp_path / "out")
    # Every Frechet distance the evaluator computes, with its arguments: FID is checked against
    # the statistics of the saved features below. (The distance itself is tested in
    # test_metrics.)
    distances, frechet = [], M.frechet_distance

    def recording(mu1, sigma1, mu2, sigma2, *args, **kw):
        d = frechet(mu1, sigma1, mu2, sigma2, *args, **kw)
        distances.append(((mu1, sigma1, mu2, sigma2), d))
        return d
    monkeypatch.setattr(M, "frechet_distance", recording)
    res = E.evaluate(cfg, run, out, log=lambda s: None)
    monkeypatch.undo()
    m = res["metrics"]
    with np.load(os.path.join(out, "samples.npz")) as f:
        a = {k: f[k] for k in f.files}
    assert res["inception"] == weights and m["pr_features"] == "inception"
    assert a["real_inception"].shape == a["gen_inception"].shape == (8, 2048)
    (fid_args, fid), = [c for c in distances if np.shape(c[0][0]) == (2048,)]
    assert m["fid"] == fid
    want = M.feature_statistics(a["real_inception"]) + M.feature_statistics(a["gen_inception"])
    for got, w in zip(fid_args, want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-9)
    k = M.kid(a["real_inception"], a["gen_inception"], subset_size=6, num_subsets=5)
    assert (m["kid_mean"], m["kid_std"]) == (k["kid_mean"], k["kid_std"])
    pr = M.precision_recall(a["real_inception"], a["gen_inception"], k=3)
    assert (m["precision"], m["recall"]) == (pr["precision"], pr["recall"])
    # The features are the Flax Inception's on the saved (uint8) generated images.
    inc = InceptionFeatures(IW.load_inception_params(weights))
    np.testing.assert_allclose(inc(a["images"][:2]), a["gen_inception"][:2], rtol=1e-4,
                               atol=1e-4)
    # Real statistics cached beside the output, keyed by the evaluation set.
    key = eval_set_key(cfg, data_config(cfg, pipe, 64))
    ref = load_reference(os.path.join(out, "reference_stats.npz"), key)
    np.testing.assert_allclose(ref["features"], a["real_inception"])
    np.testing.assert_allclose(ref["mu"], a["real_inception"].astype(np.float64).mean(0),
                               rtol=1e-5, atol=1e-7)
    assert load_reference(os.path.join(out, "reference_stats.npz"), "another") is None
