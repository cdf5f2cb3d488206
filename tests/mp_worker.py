"""One process of a local multi-process run (tests/test_multiprocess.py starts several)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unclip_jax  # noqa: E402,F401
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("MP_LOCAL_DEVICES", "2")))

from unclip_jax import distributed  # noqa: E402
from unclip_jax.train.trainer import train  # noqa: E402
from trainer_util import host_tree, toy_config  # noqa: E402


def main():
    port, n, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n > 1:
        distributed.initialize(f"127.0.0.1:{port}", n, pid)
    over = {"mesh.data": -1}
    if int(os.environ.get("MP_SIGTERM_PROCESS", "-1")) == pid:  # a preemption notice on one host
        over["data.sigterm_at_step"] = int(os.environ["MP_SIGTERM_STEP"])
    out = train(toy_config(**over), workdir)
    params = host_tree(out["state"].params)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "loss": out["metrics"]["loss"],
        "status": out["status"], "step": out["step"],
        "kernel_sum": float(params["up_0"]["kernel"].sum()),
    }), flush=True)


if __name__ == "__main__":
    main()
