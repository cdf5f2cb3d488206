"""Start-up: which environment `distributed.plan` picks, with each cluster's environment faked the
way JAX's own cluster tests do (os.environ patched, the TPU VM metadata server answered), and a
wrong setting that ends with a clear error within the timeout instead of a hang."""
import os
import subprocess
import sys
import time
from unittest import mock

import portpicker
import pytest
from jax._src.clusters import cloud_tpu_cluster

from unclip_jax import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[7-8]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def _tpu_vm(metadata, env=None):
    """Patches that make this host look like a Cloud TPU VM worker whose metadata server
    answers `metadata` (key -> text)."""
    def get_metadata(key):
        return (metadata[key], 200) if key in metadata else ("", 404)
    return [mock.patch.dict(os.environ, env or {}, clear=True),
            mock.patch.object(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True),
            mock.patch.object(cloud_tpu_cluster, "get_metadata", get_metadata)]


def _plan_with(patches, *args):
    for p in patches:
        p.start()
    try:
        return distributed.plan(*args)
    finally:
        for p in reversed(patches):
            p.stop()


def test_no_cluster_runs_alone():
    assert _plan_with([mock.patch.dict(os.environ, {}, clear=True)]) is None


def test_explicit_flags_win_and_go_together():
    with mock.patch.dict(os.environ, SLURM, clear=True):
        assert distributed.plan("10.0.0.1:1234", 4, 3) == {
            "method": "flags", "coordinator_address": "10.0.0.1:1234", "num_processes": 4,
            "process_id": 3}
        assert distributed.plan("10.0.0.1:1234", 1, 0) is None  # one process: nobody to wait for
        with pytest.raises(ValueError, match="go together"):
            distributed.plan("10.0.0.1:1234", 4, None)
        with pytest.raises(ValueError, match=r"--process_id=4 is not in \[0, --num_processes=4\)"):
            distributed.plan("10.0.0.1:1234", 4, 4)


def test_slurm():
    p = _plan_with([mock.patch.dict(os.environ, SLURM, clear=True)])
    assert p["method"] == "slurm" and p["num_processes"] == 16 and p["process_id"] == 9
    assert p["coordinator_address"] == "node7:" + str(4242 % 4096 + 65535 - 4095)
    one_task = dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0")
    assert _plan_with([mock.patch.dict(os.environ, one_task, clear=True)]) is None


def test_tpu_vm_single_slice():
    meta = {"agent-worker-number": "2", "tpu-env": "",
            "worker-network-endpoints": "10.1.0.5,10.1.0.6,10.1.0.7,10.1.0.8"}
    p = _plan_with(_tpu_vm(meta))
    assert p == {"method": "gcetpu", "num_processes": 4, "process_id": 2,
                 "coordinator_address": "10.1.0.5:8482"}


def test_tpu_vm_multi_slice():
    meta = {"agent-worker-number": "1", "tpu-env": "",
            "worker-network-endpoints": "10.1.0.5,10.1.0.6"}
    env = {"MEGASCALE_COORDINATOR_ADDRESS": "10.9.0.1", "MEGASCALE_NUM_SLICES": "3",
           "MEGASCALE_SLICE_ID": "2"}
    p = _plan_with(_tpu_vm(meta, env))
    assert p == {"method": "gcetpu", "num_processes": 6, "process_id": 5,
                 "coordinator_address": "10.9.0.1:8482"}


def test_single_host_tpu_vm_never_waits_for_peers():
    meta = {"agent-worker-number": "0", "tpu-env": "", "worker-network-endpoints": "10.1.0.5"}
    assert _plan_with(_tpu_vm(meta)) is None


def test_wrong_process_count_is_a_clear_error_within_the_timeout():
    # Process 0 of a job said to have 2 processes, whose peer never comes.
    code = ("from unclip_jax import distributed; "
            f"distributed.initialize('127.0.0.1:{portpicker.pick_unused_port()}', 2, 0)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, UNCLIP_DISTRIBUTED_TIMEOUT="2", JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert time.perf_counter() - t < 60
    assert "process 0 of 2 (flags) could not join the job at 127.0.0.1:" in r.stderr
    assert "within 2 s" in r.stderr
