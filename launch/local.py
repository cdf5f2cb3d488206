#!/usr/bin/env python
"""Run one command as N local JAX processes (multi-host behaviour on one machine, for testing).

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      python -m unclip_jax.main --config=experiments/toy.py --workdir=runs/toy_mp

Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i appended,
and `devices_per_process` fake CPU devices (XLA_FLAGS). Output of process i is prefixed "[i]".
Exits with the first non-zero return code (and stops the others).
"""
import argparse
import os
import socket
import subprocess
import sys
import threading


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(i, stream, out):
    for line in stream:
        out.write(f"[{i}] {line}")
        out.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=0,
                   help="fake CPU devices per process (0: leave the platform's devices)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command after --")
    port = a.port or _free_port()
    procs, threads = [], []
    for i in range(a.num_processes):
        env = dict(os.environ)
        if a.devices_per_process:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                                f"{a.devices_per_process}").strip()
        if i:
            env["UNCLIP_NO_PROGRESS"] = "1"
        full = cmd + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={a.num_processes}",
                      f"--process_id={i}"]
        pr = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t = threading.Thread(target=_pump, args=(i, pr.stdout, sys.stdout), daemon=True)
        t.start()
        procs.append(pr)
        threads.append(t)
    rc = 0
    for pr in procs:
        code = pr.wait()
        if code and not rc:
            rc = code
            for other in procs:
                if other.poll() is None:
                    other.terminate()
    for t in threads:
        t.join(timeout=5)
    sys.exit(rc)


if __name__ == "__main__":
    main()
