"""Two local processes (jax.distributed on 127.0.0.1) train the toy stage and agree with each
other and with one process holding all the devices. The toy's examples come from webdataset
shards (the file readers' global order) except in the preemption test."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers.processes import run_workers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BATCH = 16  # toy_config's global batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 examples in shards of 8: a 12-step run of 16 is 4.8 epochs, the epochs' boundaries
    fall inside batches."""
    from unclip_jax.data import synthetic
    return synthetic.write_webdataset_shards(str(tmp_path_factory.mktemp("shards")),
                                             num_examples=40, shard_size=8, image_size=8)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shards):
    """The reference: one process with 4 devices trains the toy run uninterrupted."""
    return run_workers(1, 4, str(tmp_path_factory.mktemp("one")), MP_SHARDS=shards)[0]


def _global_ids(runs):
    """Per step, the global batch's example ids: the processes' rows in process order."""
    return [[i for part in step for i in part] for step in zip(*(r["ids"] for r in runs))]


def test_two_processes_agree_with_one(tmp_path, one_process, shards):
    two = run_workers(2, 2, str(tmp_path / "two"), MP_SHARDS=shards)
    assert {r["process"] for r in two} == {0, 1}
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in two)
    assert two[0]["loss"] == two[1]["loss"]
    assert two[0]["kernel_sum"] == two[1]["kernel_sum"]
    assert not any(r["torch_imported"] for r in two)   # process 0 wrote TensorBoard events
    # Each process fed its own half of every global batch: same result as one process with 4.
    one = one_process
    assert one["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    assert one["kernel_sum"] == pytest.approx(two[0]["kernel_sum"], rel=1e-4, abs=1e-4)
    assert _global_ids(two) == one["ids"] and len(one["ids"]) == 12
    # Only process 0 wrote metrics; the checkpoint is complete.
    assert os.path.exists(tmp_path / "two" / "metrics.jsonl")
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "12")


def test_resume_on_another_process_count(tmp_path, one_process, shards):
    """2 processes train to step 4, 1 process (with half the devices) resumes to 8, 2 processes
    finish: the same examples in the same global batches, and the same parameters, as one
    uninterrupted process."""
    wd = str(tmp_path / "resize")
    a = run_workers(2, 2, wd, MP_STOP_AT="4", MP_SHARDS=shards)
    b = run_workers(1, 2, wd, MP_STOP_AT="8", MP_SHARDS=shards)
    c = run_workers(2, 2, wd, MP_SHARDS=shards)
    assert [r["resumed_from"] for r in a + b + c] == [0, 0, 4, 8, 8]
    assert [r["step"] for r in a + b + c] == [4, 4, 8, 12, 12]
    assert [r["examples"] for r in a + b + c] == [4 * BATCH] * 2 + [8 * BATCH] + [12 * BATCH] * 2
    # Every step's global batch is the uninterrupted run's, example for example.
    ids = _global_ids(a) + b[0]["ids"] + _global_ids(c)
    assert ids == one_process["ids"] and sum(map(len, ids)) == 12 * BATCH
    assert not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))
    for got, want in zip(c[0]["params"], one_process["params"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert c[0]["params"] == c[1]["params"]
    # The job's position is one record in the checkpoint, written for 2 processes.
    with open(os.path.join(wd, "checkpoints", "12", "data", "metadata")) as f:
        position = json.load(f)
    assert position["examples"] == 12 * BATCH and position["process_count"] == 2
    assert [p["position"] for p in position["processes"]] == [12 * BATCH] * 2


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    # The coordination service tells every host of the notice and agrees on a step a little
    # ahead of the furthest host (hosts drift apart between checkpoints: no per-step sync), so
    # the run is long enough for that step to come before the end.
    wd = str(tmp_path / "pre")
    two = run_workers(2, 2, wd, MP_SIGTERM_PROCESS="1", MP_SIGTERM_STEP="5", MP_NUM_STEPS="24")
    assert [r["status"] for r in two] == ["preempted", "preempted"]
    stop = two[0]["step"]
    assert two[1]["step"] == stop and 6 <= stop < 24  # the notice came during step 6
    assert two[0]["params"] == two[1]["params"]
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(stop)))
    resumed = run_workers(2, 2, wd, MP_NUM_STEPS="24")
    assert [r["status"] for r in resumed] == ["done", "done"] and resumed[0]["step"] == 24
    assert resumed[0]["resumed_from"] == stop and resumed[0]["examples"] == 24 * 16


def test_local_launcher_runs_main_on_two_processes(tmp_path):
    root = ROOT
    wd = tmp_path / "launched"
    r = subprocess.run(
        [sys.executable, os.path.join(root, "launch", "local.py"), "--num_processes=2",
         "--devices_per_process=2", "--", sys.executable, "-m", "unclip_jax.main",
         f"--config={root}/experiments/toy.py", f"--workdir={wd}", "--config.train.num_steps=4",
         "--config.train.log_every=2"],
        capture_output=True, text=True, timeout=300, cwd=root,
        env=dict(os.environ, UNCLIP_NO_PROGRESS="1"))
    assert r.returncode == 0, r.stdout[-3000:]
    # Only process 0 reports, and it saw 4 global devices.
    assert "[0] done at step 4 (resumed from 0)" in r.stdout
    assert "[1] done" not in r.stdout
    assert os.path.isdir(wd / "checkpoints" / "4")


def test_shapes_counts_are_summed_over_processes(tmp_path):
    """The evaluator's shapes counts and confusion table, merged over two processes (one with two
    batches, one with one; then one with none), equal a one-process merge of all the batches."""
    from unclip_jax.eval.gather import merge_shapes as _merge_shapes
    two = run_workers(2, 1, str(tmp_path / "m"), MP_TASK="merge_shapes")
    assert sorted(r["process"] for r in two) == [0, 1]
    by = {r["process"]: r for r in two}
    parts0, parts1 = by[0]["parts"], by[1]["parts"]
    assert len(parts0) == 2 and len(parts1) == 1
    want = _merge_shapes(parts0 + parts1)
    want_empty = _merge_shapes(parts0)
    assert want["single_count"] == 15 and want["two_count"] == 3
    # The captions make every cell kind occur: right shapes, wrong ones, and "none".
    conf = want["shape_confusion"]
    assert sum(conf[s][s] for s in conf) == want["shape_count"] > 0
    assert sum(row["none"] for row in conf.values()) == 3
    assert want["shape_count"] < want["single_count"] - 3
    for r in two:   # every process gets the global result
        assert r["merged"] == want
        assert r["merged_empty"] == want_empty
