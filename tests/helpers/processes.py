"""Start N local processes of tests/helpers/mp_worker.py (jax.distributed on 127.0.0.1) and
collect each one's RESULT line."""
import json
import os
import subprocess
import sys

import portpicker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")


def run_workers(n: int, local_devices: int, workdir: str, **extra_env) -> list[dict]:
    """Each process's RESULT (JSON), in process order; a failing process fails the test with
    the end of its stderr. The processes inherit the session's XLA flags (tests/conftest.py:
    they halve a compile's CPU) and its compilation cache."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, MP_LOCAL_DEVICES=str(local_devices), JAX_PLATFORMS="cpu",
               UNCLIP_NO_PROGRESS="1", **extra_env)
    procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(n), str(i), workdir],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return results
