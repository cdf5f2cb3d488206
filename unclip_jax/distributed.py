"""Multi-host start-up through `jax.distributed.initialize` and its cluster detection, and the
small host-to-host agreements the trainer needs (through the coordination service, no devices).

JAX is imported inside the functions: the entry points' host setup (`host_malloc.prepare_cpu_host`)
asks `cluster_detected` before JAX may be imported.
"""
from __future__ import annotations

import json
import os

from absl import logging

_initialized = False

# How long start-up waits for every process to join, and a host agreement for every answer.
TIMEOUT_ENV = "UNCLIP_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def timeout_s(environ=os.environ) -> int:
    return int(environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)


def cluster_detected(environ=os.environ) -> bool:
    """A hint for the host setup that runs before JAX may be imported: whether the environment
    looks like a multi-process cluster job (SLURM with several tasks, a TPU VM worker list).
    Start-up itself asks JAX's own detection (`plan`)."""
    if int(environ.get("SLURM_NTASKS", "1") or "1") > 1:
        return True
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> dict | None:
    """How this process joins the job: {"method", "coordinator_address", "num_processes",
    "process_id"}, or None when it runs alone (no flags, no cluster, or a cluster of one process:
    a single host never waits for peers).

    Explicit flags win and must come together. Otherwise JAX's cluster detection
    (`jax._src.clusters`: Cloud TPU VM single- and multi-slice, SLURM, Open MPI, Kubernetes, ...)
    names the environment, the process count and this process's index."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                             f"got coordinator_address={coordinator_address!r}, num_processes="
                             f"{num_processes!r}, process_id={process_id!r}")
        n, pid = int(num_processes), int(process_id)
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"--process_id={pid} is not in [0, --num_processes={n})")
        if n == 1:
            return None
        return {"method": "flags", "coordinator_address": coordinator_address,
                "num_processes": n, "process_id": pid}
    from jax._src import clusters
    env = next((e for e in clusters.ClusterEnv._cluster_types
                if not e.opt_in_only_method and e.is_env_present()), None)
    if env is None:
        return None
    n = int(env.get_process_count())
    if n <= 1:
        return None
    port = os.environ.get("JAX_COORDINATOR_PORT")
    return {"method": env.name or env.__name__, "num_processes": n,
            "process_id": int(env.get_process_id()),
            "coordinator_address": env.get_coordinator_address(
                timeout_secs=timeout_s(), override_coordinator_port=port)}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Start jax.distributed when this is a multi-process job (`plan`); a no-op for one process.

    Every process must join within `UNCLIP_DISTRIBUTED_TIMEOUT` seconds (default 300): a wrong
    process count or coordinator address ends in a clear error, not a hang."""
    global _initialized
    if _initialized:
        return
    p = plan(coordinator_address, num_processes, process_id)
    if p is None:
        return
    import sys
    import threading

    import jax
    t = timeout_s()
    hint = (f"unclip_jax: process {p['process_id']} of {p['num_processes']} ({p['method']}) "
            f"could not join the job at {p['coordinator_address']} within {t} s: check that "
            f"every process was started with the same process count and coordinator address, "
            f"that all {p['num_processes']} are running and process 0 is reachable "
            f"({TIMEOUT_ENV} sets the wait)")
    # JAX ends the process itself when the deadline passes (a fatal error, not an exception):
    # say what to check just before it does.
    watchdog = threading.Timer(max(t - 0.5, 0.1), lambda: print(hint, file=sys.stderr,
                                                                 flush=True))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=p["coordinator_address"], num_processes=p["num_processes"],
            process_id=p["process_id"], local_device_ids=local_device_ids,
            initialization_timeout=t)
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise RuntimeError(f"{hint} ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        watchdog.cancel()
    _initialized = True
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices",
                 p["method"], jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


_agreements = 0


def host_values(name: str, value) -> list:
    """Every process's JSON-serialisable `value`, in process order, exchanged through the
    coordination service's key-value store (no device computation). A process that does not
    answer within the start-up timeout is an error on every process that waits for it, naming
    it. All processes must call this in the same order."""
    import jax
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jd
    global _agreements
    _agreements += 1
    client = jd.global_state.client
    key = f"unclip_jax/{_agreements}/{name}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    out, t = [], timeout_s()
    for i in range(jax.process_count()):
        try:
            out.append(json.loads(client.blocking_key_value_get(f"{key}/{i}", t * 1000)))
        except Exception as e:  # noqa: BLE001 - a peer died or hangs
            raise RuntimeError(f"process {i} did not answer '{name}' within {t} s "
                               f"({type(e).__name__}: {str(e)[:200]}); every process stops "
                               "here rather than hang") from e
    return out


# Written last into a directory that write_once uploads to object storage: its presence means
# the directory is complete (an object store has no atomic rename of a directory).
DONE_FILE = ".complete"


def written(path: str) -> bool:
    """Whether `write_once` finished `path`: a file, or a non-empty directory (on object
    storage: a directory holding DONE_FILE)."""
    from unclip_jax import paths
    p = paths.path(path)
    if paths.is_url(path):
        paths.refresh(path)  # written by another process, maybe after this one listed it
        return p.is_file() or (p / DONE_FILE).exists()
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def write_once(path: str, write) -> None:
    """Create `path` (a file or a directory, local or on object storage) once for all processes
    of the job.

    Process 0 runs `write(tmp)` into a local temporary name and moves it into place (a rename
    beside `path`; on object storage an upload, a directory's DONE_FILE last), so no process ever
    reads a half-written file and two processes never write the same one; the others wait at a
    barrier until it exists."""
    import shutil
    import tempfile

    import jax
    from jax.experimental import multihost_utils

    from unclip_jax import paths

    if jax.process_index() == 0 and not written(path):
        if paths.is_url(path):
            with tempfile.TemporaryDirectory(prefix="unclip_jax_write_") as d:
                name = str(path).rstrip("/").rsplit("/", 1)[-1]
                tmp = os.path.join(d, name)
                write(tmp)
                paths.upload(tmp, path)
                if os.path.isdir(tmp):
                    paths.write_text(f"{str(path).rstrip('/')}/{DONE_FILE}", "")
        else:
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
