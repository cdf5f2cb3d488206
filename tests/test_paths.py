"""Workdirs and data on object storage (gs://) through the one path layer, against a real local
GCS emulator: training, kill and resume, metrics, listing and reading shards."""
import json
import os

import pytest
from etils import epath

from helpers.gcs import emulator
from helpers.trainer import assert_trees_close, toy_config
from unclip_jax import paths


@pytest.fixture(scope="module")
def bucket():
    with emulator() as b:
        yield b


def test_glob_lists_object_store_shards(bucket):
    for name in ("shards/a-0.tar", "shards/a-1.tar", "shards/notes.txt", "other/a-2.tar"):
        epath.Path(f"{bucket}/data/{name}").write_bytes(b"x")
    assert paths.glob(f"{bucket}/data/shards/*.tar") == [
        f"{bucket}/data/shards/a-0.tar", f"{bucket}/data/shards/a-1.tar"]
    assert paths.glob(f"{bucket}/data/*/a-*.tar") == [
        f"{bucket}/data/other/a-2.tar", f"{bucket}/data/shards/a-0.tar",
        f"{bucket}/data/shards/a-1.tar"]
    assert paths.glob(f"{bucket}/nothing/*.tar") == []


def test_train_kill_and_resume_on_gcs(bucket, tmp_path, monkeypatch):
    from unclip_jax.train.trainer import train
    monkeypatch.chdir(tmp_path)  # a local folder named "gs:" would appear here
    wd = f"{bucket}/runs/toy"
    first = train(toy_config(), wd, stop_at=6)
    assert first["step"] == 6
    second = train(toy_config(), wd)
    assert second["resumed_from"] == 6 and second["step"] == 12
    full = train(toy_config(), str(tmp_path / "local"))
    assert_trees_close(full["state"].params, second["state"].params)
    root = epath.Path(wd)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["12", "6", "8"]
    rows = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["examples"] == 12 * 16
    assert json.loads((root / "config.json").read_text())["stage"] == "toy"
    assert list((root / "tensorboard").iterdir())
    # What sampling and evaluation load (read only): the EMA parameters of the last step.
    from unclip_jax.train.checkpoint import load_trained
    loaded = load_trained(wd)
    assert loaded.step == 12
    assert_trees_close(full["state"].ema_params, loaded.params)
    assert not os.path.exists(tmp_path / "gs:")
    assert sorted(os.listdir(tmp_path)) == ["local"]


def test_whole_file_writes_and_write_once_on_gcs(bucket, tmp_path, monkeypatch):
    """A failed write leaves nothing a reader would take for the file; write_once's directory
    counts as written only once its every file is uploaded (object stores have no atomic
    rename of a directory)."""
    import numpy as np

    from unclip_jax import distributed
    monkeypatch.chdir(tmp_path)
    f = f"{bucket}/w/a.npy"
    with pytest.raises(RuntimeError, match="disk full"):
        with paths.atomic_write(f) as fh:
            fh.write(b"half")
            raise RuntimeError("disk full")
    assert not epath.Path(f).exists()
    paths.save_npy(f, np.arange(3))
    np.testing.assert_array_equal(paths.np_load(f), np.arange(3))
    np.testing.assert_array_equal(np.load(paths.local_file(f), mmap_mode="r"), np.arange(3))

    d = f"{bucket}/w/tok"

    def write_dir(tmp, fail=False):
        os.makedirs(tmp)
        for name in ("a.json", "b.json"):
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write(name)
        if fail:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        distributed.write_once(d, lambda tmp: write_dir(tmp, fail=True))
    assert not distributed.written(d)
    distributed.write_once(d, write_dir)
    assert distributed.written(d)
    assert sorted(p.name for p in epath.Path(d).iterdir()) == [".complete", "a.json", "b.json"]
    distributed.write_once(d, lambda tmp: pytest.fail("written twice"))
    local = paths.local_dir(d)
    assert open(os.path.join(local, "b.json")).read() == "b.json"
    assert os.listdir(tmp_path) == []   # no local folder named "gs:"


def test_smoke_on_a_missing_bucket_and_npz_files_on_gcs(bucket, tmp_path, monkeypatch):
    """A :smoke variant on a bucket that does not exist: one error naming it, before any input
    is made (the training on gs:// is in tests/stages/test_smoke.py). The PCA / quantiser of an
    embedding cache and the FID statistics save to and load from gs:// as they do locally."""
    import numpy as np

    from unclip_jax import main
    from unclip_jax.eval import metrics
    from unclip_jax.models import pca
    from helpers.trainer import load_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket does not exist"):
        main.run(load_config("paper/decoder_64.py", "smoke"), "gs://no-such-bucket/run")
    assert os.listdir(tmp_path) == []
    x = np.random.default_rng(0).standard_normal((64, 6))
    p, q = pca.fit_pca([x]), pca.fit_quantizer(x, 8)
    p.save(f"{bucket}/npz/pca.npz")
    q.save(f"{bucket}/npz/quantizer.npz")
    got_p, got_q = pca.PCA.load(f"{bucket}/npz/pca.npz"), pca.Quantizer.load(
        f"{bucket}/npz/quantizer.npz")
    np.testing.assert_array_equal(got_p.components, p.components)
    np.testing.assert_array_equal(got_q.centres, q.centres)
    st = metrics.FeatureStats(6).update(x)
    st.save(f"{bucket}/npz/ref.npz")
    mu, sigma = metrics.load_statistics(f"{bucket}/npz/ref.npz")
    np.testing.assert_array_equal(mu, st.mean)
    np.testing.assert_array_equal(sigma, st.cov)
    assert os.listdir(tmp_path) == []


def test_webdata_inputs_and_imported_clip_on_gcs(bucket, tmp_path, monkeypatch):
    """The webdata recipe on a gs:// workdir: its :smoke inputs (shards, a random HF CLIP) are
    made under <workdir>/inputs in the bucket, nothing locally; the run's CLIP stage links that
    gs:// folder and loads its weights and tokenizer (through a local copy); a bad gs:// folder
    is refused naming its URL."""
    import jax
    import numpy as np

    from helpers.trainer import load_config
    from unclip_jax.models import clip_import
    from unclip_jax.recipes import webdata
    monkeypatch.chdir(tmp_path)
    wd = f"{bucket}/runs/web"
    config = webdata.prepare(load_config("webdata.py", "smoke"), wd)
    hf = f"{wd}/inputs/hf_clip"
    assert config.clip_import.hf_dir == hf
    assert config.data.path == f"{wd}/inputs/web/{{split}}/*.tar"
    for split, n in (("train", 4), ("test", 1)):   # 32 and 8 examples, 8 a shard
        shards = paths.glob(config.data.path.format(split=split))
        assert len(shards) == n and all(s.startswith(f"{wd}/inputs/web/{split}/") for s in shards)
    webdata.check(config, wd, {})   # the gs:// CLIP folder checked, captions read from gs://
    assert webdata.clip_spec(config)["embed_dim"] == 16
    stage = f"{wd}/clip"
    clip_import.link_clip_stage(stage, hf)
    assert json.loads(epath.Path(f"{stage}/hf_clip.json").read_text()) == {"hf_dir": hf}
    assert clip_import.linked_hf_dir(stage) == hf
    loaded = clip_import.load_clip_stage(stage)
    assert loaded.workdir == stage and loaded.config.tokenizer.dir == hf
    # The same weights and tokenizer as the folder downloaded by hand.
    local = tmp_path / "hf"
    local.mkdir()
    for f in epath.Path(hf).iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    _, want, tok = clip_import.load_hf_clip(str(local))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    from unclip_jax.data.tokenizer import Tokenizer
    tok_gs = Tokenizer.load(loaded.config.tokenizer.dir)   # what the pipeline loads
    captions = ["a red circle", "a small blue square above a green triangle"]
    np.testing.assert_array_equal(tok_gs.encode(captions)[0], tok.encode(captions)[0])
    assert tok_gs.pad_id == tok.pad_id and tok_gs.vocab_size == tok.vocab_size
    # Bad gs:// folders: the error names the URL.
    paths.upload(str(local), f"{bucket}/other_clip")
    with pytest.raises(ValueError, match=f"{stage}/hf_clip.json imports {hf}, not "
                                         f"{bucket}/other_clip"):
        clip_import.link_clip_stage(stage, f"{bucket}/other_clip")
    with pytest.raises(FileNotFoundError, match=f"folder '{bucket}/nothing' does not exist"):
        clip_import.check_hf_clip_dir(f"{bucket}/nothing")
    epath.Path(f"{bucket}/half_clip/config.json").write_text(
        epath.Path(f"{hf}/config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"folder '{bucket}/half_clip' has no "
                                                r"\*.safetensors"):
        clip_import.check_hf_clip_dir(f"{bucket}/half_clip")
    assert os.listdir(tmp_path) == ["hf"]   # nothing else local: no folder named "gs:"


def test_weights_to_import_on_gcs(bucket, tmp_path, monkeypatch):
    """Inception weights (.npz) named by a gs:// URL are read from a local copy; a missing one
    is the same clear error as a missing local file, naming the URL."""
    import numpy as np

    from unclip_jax.eval.inception_weights import read_state
    monkeypatch.chdir(tmp_path)
    state = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2)}
    paths.save_npz(f"{bucket}/weights/inception.npz", **state)
    got = read_state(f"{bucket}/weights/inception.npz")
    assert sorted(got) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    with pytest.raises(FileNotFoundError, match=f"{bucket}/weights/missing.npz"):
        read_state(f"{bucket}/weights/missing.npz")
    assert os.listdir(tmp_path) == []
