"""The package as a whole: importing it has no side effects, and every command answers --help.

All the subprocesses start together (one module fixture) and each test waits for its own, so the
file costs about as much wall time as its slowest subprocess.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every module of the package in a fresh interpreter that looks like a command
# (`python -m unclip_jax.main`, so host_malloc.choose would pick a remedy), with every way of
# starting or replacing a process recorded instead of taken; prints what changed.
_IMPORT_ALL = r"""
import importlib, json, os, pkgutil, subprocess, sys

sys.orig_argv = [sys.executable, "-m", "unclip_jax.main"]
calls = []

def _record(name):
    def refuse(*args, **kwargs):
        calls.append(name)
        raise OSError(f"{name} called while importing the package")
    return refuse

for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe"):
    if hasattr(os, name):
        setattr(os, name, _record(f"os.{name}"))
subprocess.Popen._execute_child = _record("subprocess.Popen")
before = dict(os.environ)

import unclip_jax
modules, failed = ["unclip_jax"], {}
for info in pkgutil.walk_packages(unclip_jax.__path__, "unclip_jax."):
    try:
        importlib.import_module(info.name)
        modules.append(info.name)
    except Exception as e:  # noqa: BLE001 - reported by the test
        failed[info.name] = f"{type(e).__name__}: {e}"
after = dict(os.environ)
pid = str(os.getpid())
children = []
for entry in os.listdir("/proc"):
    try:
        with open(f"/proc/{entry}/stat") as f:
            if entry.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == pid:
                children.append(int(entry))
    except (OSError, IndexError):
        pass
print(json.dumps(dict(
    modules=modules, failed=failed, calls=calls, children=children,
    changed={k: [before.get(k), after.get(k)] for k in set(before) | set(after)
             if before.get(k) != after.get(k)})))
"""

# Every command, and words its --help must show (what it does, from its module docstring).
COMMANDS = {
    "main": "Train one stage, or the whole unCLIP stack",
    "sample": "Sample from the main job's trained stages",
    "evaluate": "Evaluate a trained unCLIP run",
    "embed": "Write a CLIP embedding cache",
    "convert": "Convert released weights into an unclip-jax workdir",
    "bench": "Training throughput of any stage's real sharded train step",
    "aot": "Ahead-of-time plan of a sharded train step",
    "tools.bench_conv": "Where a stage's train step spends its convolution time",
    "tools.bench_sampling": "Sampling speed of a stage's model",
    "tools.hardware": "this host's memory settings for JAX on the CPU",
    "tools.demo_sampler": "Sample a 2-D Gaussian mixture with its closed-form ideal denoiser",
    "models.pca": "PCA and per-dimension quantisation of CLIP image embeddings",
    "eval.inception_weights": "Load the FID Inception weights",
}
_OURS = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "UNCLIP_JAX_MALLOC", "LD_PRELOAD",
         "GLIBC_TUNABLES", "XLA_FLAGS", "_UNCLIP_JAX_REEXECUTED")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def procs():
    """Start every subprocess of this file at once; {key: Popen}."""
    def start(args, env):
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The import check runs without JAX_PLATFORMS / UNCLIP_JAX_MALLOC, as a user's shell would.
    out = {"import_all": start(["-c", _IMPORT_ALL], _env())}
    for name in COMMANDS:
        out[name] = start(["-m", f"unclip_jax.{name}", "--help"],
                          _env(JAX_PLATFORMS="cpu", UNCLIP_JAX_MALLOC="off"))
    yield out
    for p in out.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait(p):
    stdout, stderr = p.communicate(timeout=600)
    return p.returncode, stdout, stderr


def test_importing_every_module_sets_no_variable_and_starts_no_process(procs):
    rc, stdout, stderr = _wait(procs["import_all"])
    assert rc == 0, stderr[-3000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert not got["failed"], got["failed"]
    assert len(got["modules"]) > 50 and "unclip_jax.tools.host_malloc" in got["modules"]
    assert got["changed"] == {}, got["changed"]
    assert got["calls"] == [], got["calls"]         # no fork, spawn, subprocess or re-exec
    assert got["children"] == [], got["children"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_help(procs, name):
    rc, stdout, stderr = _wait(procs[name])
    assert rc == 0, (stdout[-1000:], stderr[-3000:])
    assert COMMANDS[name] in " ".join(stdout.split()), stdout[:2000]
    assert "--" in stdout                             # and lists its flags
    assert "after JAX was imported" not in stderr     # the host setup came first
