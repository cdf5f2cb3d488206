"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster environment.

JAX is imported inside the functions: the entry points' host setup (`host_malloc.prepare_cpu_host`)
asks `cluster_detected` before JAX may be imported.
"""
from __future__ import annotations

import os

from absl import logging

_initialized = False


def cluster_detected(environ=os.environ) -> bool:
    """Whether this is one process of a multi-process cluster job that
    `jax.distributed.initialize()` detects by itself (Cloud TPU VM slices, SLURM)."""
    if int(environ.get("SLURM_NTASKS", "1") or "1") > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Start jax.distributed when this is a multi-process job; a no-op for one process.

    Explicit arguments win (e.g. local multi-process tests on 127.0.0.1); otherwise TPU pods and
    SLURM are detected from their environment variables."""
    global _initialized
    if _initialized:
        return
    import jax
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id),
                                   local_device_ids=local_device_ids)
        _initialized = True
    elif cluster_detected():
        jax.distributed.initialize()
        _initialized = True
    if _initialized:
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def write_once(path: str, write) -> None:
    """Create `path` (a file or a directory) once for all processes of the job.

    Process 0 runs `write(tmp)` into a temporary name beside `path` and renames it into place,
    so no process ever reads a half-written file and two processes never write the same one; the
    others wait at a barrier until it exists."""
    import shutil

    import jax
    from jax.experimental import multihost_utils

    if jax.process_index() == 0 and not (os.path.exists(path) and (
            not os.path.isdir(path) or os.listdir(path))):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        root, ext = os.path.splitext(os.path.abspath(path))
        tmp = f"{root}.tmp{os.getpid()}{ext}"
        try:
            write(tmp)
            if os.path.isdir(path):
                os.rmdir(path)  # an empty directory left by an earlier failed write
            os.replace(tmp, path)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"write_once {path}")
