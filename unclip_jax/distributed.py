"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster environment."""
from __future__ import annotations

import os

import jax
from absl import logging

_initialized = False


def _cluster_detected() -> bool:
    # Cloud TPU VM slices and SLURM jobs are auto-detected by jax.distributed.initialize().
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "") and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
        return True
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Start jax.distributed when this is a multi-process job; a no-op for one process.

    Explicit arguments win (e.g. local multi-process tests on 127.0.0.1); otherwise TPU pods and
    SLURM are detected from their environment variables."""
    global _initialized
    if _initialized:
        return
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id),
                                   local_device_ids=local_device_ids)
        _initialized = True
    elif _cluster_detected():
        jax.distributed.initialize()
        _initialized = True
    if _initialized:
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())
