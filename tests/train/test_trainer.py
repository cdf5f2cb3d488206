"""The generic trainer on the toy stage: sharding parity, exact resume, preemption, NaN skipping."""
import json
import os

import jax
import numpy as np
import pytest

from unclip_jax.train import trainer
from unclip_jax.train.trainer import NonFiniteError, train, validate_config

from helpers.trainer import assert_trees_close, host_tree, toy_config


def test_sharded_mesh_matches_single_device(tmp_path):
    one = train(toy_config(**{"mesh.num_devices": 1, "mesh.data": 1}), str(tmp_path / "one"))
    mesh = train(toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
                 str(tmp_path / "mesh"))
    assert dict(mesh["mesh"].shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # Parameters really are sharded over fsdp x tensor (the toy MLP kernels are (embed, mlp)).
    kernel = mesh["state"].params["up_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert one["metrics"]["loss"] == pytest.approx(mesh["metrics"]["loss"], rel=1e-5)
    assert_trees_close(one["state"].params, mesh["state"].params, rtol=1e-4, atol=1e-6)


def test_kill_and_resume_is_exact(tmp_path):
    full = train(toy_config(), str(tmp_path / "full"))
    first = train(toy_config(), str(tmp_path / "resumed"), stop_at=6)
    assert first["step"] == 6
    second = train(toy_config(), str(tmp_path / "resumed"))
    assert second["resumed_from"] == 6 and second["step"] == 12
    # Same data order, same dropout keys, same optimiser state: bitwise identical.
    assert_trees_close(full["state"].params, second["state"].params)
    assert_trees_close(full["state"].opt_state, second["state"].opt_state)
    assert_trees_close(full["state"].ema_params, second["state"].ema_params)
    # Running again on a finished workdir trains nothing more.
    third = train(toy_config(), str(tmp_path / "resumed"))
    assert third["resumed_from"] == 12 and third["step"] == 12


def test_sigterm_saves_and_resume_continues(tmp_path):
    wd = str(tmp_path / "pre")
    out = train(toy_config(**{"data.sigterm_at_step": 4}), wd)
    assert out["status"] == "preempted"
    assert out["step"] == 5  # the step in flight when the signal came finishes, then saves
    assert 5 in trainer.Checkpointer(wd).all_steps()
    resumed = train(toy_config(), wd)
    full = train(toy_config(), str(tmp_path / "full"))
    assert resumed["resumed_from"] == 5
    assert_trees_close(full["state"].params, resumed["state"].params)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    wd = str(tmp_path / "c")
    train(toy_config(), wd, stop_at=8)  # checkpoints at 4 and 8
    ck = os.path.join(wd, "checkpoints", "8", "state")
    # Truncate every data file of the newest checkpoint.
    n = 0
    for root, _, files in os.walk(ck):
        for f in files:
            if not f.startswith("_") and not f.endswith(".json"):
                open(os.path.join(root, f), "wb").close()
                n += 1
    assert n > 0
    resumed = train(toy_config(), wd)
    assert resumed["resumed_from"] == 4 and resumed["step"] == 12
    moved = os.listdir(os.path.join(wd, "corrupt_checkpoints"))
    assert len(moved) == 1 and moved[0].startswith("8-")  # kept aside, not deleted
    full = train(toy_config(), str(tmp_path / "full"))
    assert_trees_close(full["state"].params, resumed["state"].params)
    # Steps 6 and 8 were logged, lost with checkpoint 8, and logged again: once each in the log.
    rows = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    got, want = rows(wd), rows(str(tmp_path / "full"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)


def test_restore_onto_another_mesh(tmp_path):
    from unclip_jax import parallel
    from unclip_jax.stages import get_stage
    from unclip_jax.train.checkpoint import Checkpointer
    from unclip_jax.train.optim import make_optimizer
    from unclip_jax.train.state import prepare_state

    wd = str(tmp_path / "m")
    saved = train(toy_config(**{"mesh.data": 8}), wd)
    cfg = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    stage = get_stage("toy")
    mesh = parallel.make_mesh(cfg.mesh)
    rules = parallel.rules_from_config(cfg)
    abstract, _, _ = prepare_state(stage, stage.build_model(cfg), make_optimizer(cfg.optim, 12),
                                   cfg, mesh, rules, stage.example_batch(cfg, 1))
    state, position, step = Checkpointer(wd).restore_latest(abstract)
    assert step == 12
    assert position == {"examples": 12 * cfg.train.batch_size, "process_count": 1,
                        "processes": [{"step": 12}]}
    assert state.params["up_0"]["kernel"].sharding.mesh.shape == mesh.shape
    assert_trees_close(saved["state"], state)


def test_nan_batch_is_skipped_and_checkpoint_stays_finite(tmp_path):
    wd = str(tmp_path / "nan")
    out = train(toy_config(**{"data.poison_steps": (2,)}), wd)
    assert int(out["state"].skipped_steps) == 1 and out["step"] == 12
    clean = host_tree(out["state"].params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(clean))
    # What is on disk is that same finite state.
    from unclip_jax.train.checkpoint import load_trained
    on_disk = load_trained(wd, ema=False)
    assert on_disk.step == 12
    assert_trees_close(clean, host_tree(on_disk.params))
    # The poisoned step changed nothing: compare with a run that stops right before it.
    before = train(toy_config(), str(tmp_path / "ref"), stop_at=2)
    after_poison = train(toy_config(**{"data.poison_steps": (2,)}), str(tmp_path / "p3"), stop_at=3)
    assert_trees_close(before["state"].params, after_poison["state"].params)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["skipped_steps"] == 1.0


def test_too_many_bad_steps_stop_the_run(tmp_path):
    wd = str(tmp_path / "bad")
    cfg = toy_config(**{"data.poison_steps": (5, 6, 7, 8), "train.max_bad_steps": 3})
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(cfg, wd)
    from unclip_jax.train.checkpoint import Checkpointer
    steps = Checkpointer(wd).all_steps()
    assert steps == [4]  # the good checkpoint is untouched; nothing non-finite was saved


def test_grad_accumulation_matches_full_batch(tmp_path):
    a = train(toy_config(**{"model.dropout": 0.0}), str(tmp_path / "a"))
    b = train(toy_config(**{"model.dropout": 0.0, "train.grad_accum": 2}), str(tmp_path / "b"))
    assert_trees_close(a["state"].params, b["state"].params, rtol=1e-4, atol=1e-6)


def test_metrics_logged(tmp_path):
    wd = str(tmp_path / "log")
    train(toy_config(), wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "grad_norm", "lr", "steps_per_s", "examples_per_s",
                "examples_per_s_per_device"):
        assert key in rows[-1]
    assert rows[-1]["examples_per_s"] == pytest.approx(rows[-1]["steps_per_s"] * 16)
    assert rows[-1]["examples_per_s_per_device"] == pytest.approx(rows[-1]["examples_per_s"] / 8)
    assert os.listdir(os.path.join(wd, "tensorboard"))


@pytest.mark.parametrize("field,value,match", [
    ("train.batch_size", 12, "train.batch_size"),        # 12 does not split over 8 devices
    ("optim.lr", -1.0, "optim.lr"),
    ("optim.schedule", "linear", "optim.schedule"),
    ("train.grad_accum", 3, "train.batch_size"),
    ("mesh.data", 3, "mesh"),
    ("optim.ema_decay", 1.5, "optim.ema_decay"),
])
def test_invalid_config_names_field(field, value, match):
    cfg = toy_config(**{field: value})
    with pytest.raises(ValueError, match=match):
        validate_config(cfg, None, 8, 1)


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    f32 = train(toy_config(**{"model.dropout": 0.0}), str(tmp_path / "f32"))
    bf16 = train(toy_config(**{"model.dropout": 0.0, "model.dtype": "bfloat16"}),
                 str(tmp_path / "bf16"))
    leaves = jax.tree.leaves(bf16["state"].params) + jax.tree.leaves(bf16["state"].opt_state)
    assert all(x.dtype in (np.float32, np.int32) for x in leaves)
    # Same training, lower-precision matmuls: close but not identical.
    assert bf16["metrics"]["loss"] == pytest.approx(f32["metrics"]["loss"], rel=0.05)
    assert bf16["metrics"]["loss"] != f32["metrics"]["loss"]


def test_load_trained_reads_ema_without_touching_workdir(tmp_path):
    from unclip_jax.train.checkpoint import load_trained

    wd = str(tmp_path / "t")
    out = train(toy_config(), wd)

    def snapshot():
        return sorted((os.path.relpath(os.path.join(r, f), wd), os.path.getsize(os.path.join(r, f)))
                      for r, _, fs in os.walk(wd) for f in fs)

    before = snapshot()
    t = load_trained(wd)
    assert t.step == 12 and t.config.stage == "toy"
    assert_trees_close(t.params, out["state"].ema_params)
    assert_trees_close(load_trained(wd, ema=False).params, out["state"].params)
    assert snapshot() == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trained(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_trained(str(tmp_path / "empty"))


def test_resume_with_another_architecture_is_refused(tmp_path):
    wd = str(tmp_path / "arch")
    train(toy_config(), wd, stop_at=4)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    with pytest.raises(ValueError, match=r"model.hidden: 32 -> 64"):
        train(toy_config(**{"model.hidden": 64}), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))
    # Changing the training length (not the model) resumes fine.
    out = train(toy_config(**{"train.num_steps": 8}), wd)
    assert out["resumed_from"] == 4 and out["step"] == 8


def test_resume_with_another_optimiser_chain_is_refused_not_quarantined(tmp_path):
    # Turning gradient clipping off changes the optimiser state's layout: the checkpoint is fine,
    # the config is not, so nothing may be moved aside or retrained from step 0.
    wd = str(tmp_path / "opt")
    train(toy_config(), wd, stop_at=8)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    with pytest.raises(ValueError, match="different train state layout"):
        train(toy_config(**{"optim.grad_clip": 0.0}), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))
    out = train(toy_config(), wd)
    assert out["resumed_from"] == 8 and out["step"] == 12


def test_all_checkpoints_corrupt_is_an_error_then_a_fresh_start(tmp_path):
    wd = str(tmp_path / "allbad")
    train(toy_config(), wd, stop_at=8)
    for step in ("4", "8"):
        for root, _, files in os.walk(os.path.join(wd, "checkpoints", step, "state")):
            for f in files:
                if not f.startswith("_") and not f.endswith(".json"):
                    open(os.path.join(root, f), "wb").close()
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        train(toy_config(), wd)
    assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(wd, "corrupt_checkpoints"))) \
        == ["4", "8"]
    out = train(toy_config(), wd)  # told what happened, the user re-runs: a fresh start
    assert out["resumed_from"] is None or out["resumed_from"] == 0
    full = train(toy_config(), str(tmp_path / "full"))
    assert_trees_close(full["state"].params, out["state"].params)


def test_resume_from_a_checkpoint_with_the_older_per_process_data_position(tmp_path):
    # Checkpoints written before the position moved into the checkpoint kept
    # data_state/<step>/process_<i>.json beside it: such a run still resumes exactly.
    import shutil
    wd = str(tmp_path / "old")
    train(toy_config(), wd, stop_at=6)
    shutil.rmtree(os.path.join(wd, "checkpoints", "6", "data"))
    os.makedirs(os.path.join(wd, "data_state", "6"))
    with open(os.path.join(wd, "data_state", "6", "process_0.json"), "w") as f:
        json.dump({"step": 6}, f)
    resumed = train(toy_config(), wd)
    assert resumed["resumed_from"] == 6 and resumed["examples"] == 12 * 16
    full = train(toy_config(), str(tmp_path / "full"))
    assert_trees_close(full["state"].params, resumed["state"].params)


def test_init_prng_draws_the_parameters_only():
    """train.init_prng="rbg": the same shapes, shardings and (still threefry) train key, other
    parameter values, drawn with the same initialisers (scale kept)."""
    states = {}
    for impl in ("threefry2x32", "rbg"):
        b = trainer.build_step(toy_config(**{"train.init_prng": impl}))
        states[impl] = (b.abstract_state, b.init())
    (abs_t, st_t), (abs_r, st_r) = states["threefry2x32"], states["rbg"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abs_t) == \
        jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abs_r)
    np.testing.assert_array_equal(st_t.rng, st_r.rng)
    k_t, k_r = (np.asarray(s.params["up_0"]["kernel"]) for s in (st_t, st_r))
    assert np.abs(k_t - k_r).max() > 1e-3
    np.testing.assert_allclose(k_r.std(), k_t.std(), rtol=0.1)
