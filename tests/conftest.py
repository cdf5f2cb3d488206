"""Test session set-up: 8 fake CPU devices, a persistent XLA compilation cache, and scheduling that
builds every expensive fixture once.

- Every test sees 8 fake CPU devices, so mesh code is exercised without accelerators.
- Compiled programs go to JAX's persistent cache (UNCLIP_JAX_TEST_CACHE, default
  ~/.cache/unclip_jax/xla-tests; "off" disables it), so a repeated run skips most XLA compiles;
  subprocesses inherit the cache and the XLA flags through the environment.
- Orbax checkpoints save each array from one replica (no per-shape slicing programs).
- Under xdist (`-n 2`, with `--dist loadgroup` from pytest.ini) each test module runs on one
  worker, so its module-scoped fixtures are built once. The trained tiny main job (`tiny_run`)
  is built once per session for all workers: its builder module is scheduled first, its other
  users midway.
"""
import json
import os

# Two workers on two cores: a library's own thread pool (torch's OpenMP in the parity tests,
# OpenBLAS) only spins waiting for a core the other worker holds. torch ran a 3-image Inception
# pass in 0.4 s of CPU with one thread against 2.3 s with two. Set before anything loads them;
# subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from unclip_jax.tools import host_malloc  # noqa: E402

host_malloc.set_cpu_flags()  # the flags the command-line tools run with
# The tests spend most of their time compiling programs they run a few times, so they trade run
# speed for compile speed: LLVM at -O0 (XLA:CPU compiles about twice as fast and runs about half
# as fast; a tiny main job: 31% less CPU) and XLA:CPU's loop fusion emitters instead of its MLIR
# ones (a tiny main job: about 40% less CPU again, the same run speed), and one LLVM module per
# program instead of up to 32 compiled in parallel (the split costs CPU, and two workers on two
# cores have no core to spare: a tiny main job 5% less CPU). UNCLIP_JAX_TEST_OPT=1 keeps XLA's
# defaults. Subprocesses inherit XLA_FLAGS.
TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false",
                  "xla_cpu_parallel_codegen_split_count": "1"}
if os.environ.get("UNCLIP_JAX_TEST_OPT") != "1":
    for _flag, _value in TEST_XLA_FLAGS.items():
        if _flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] += f" --{_flag}={_value}"

_CACHE = os.environ.get("UNCLIP_JAX_TEST_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax", "xla-tests"))
if _CACHE.lower() not in ("", "0", "off", "none"):
    # Set as JAX's environment variables (read when JAX is imported), so the subprocesses the tests
    # start (multi-process workers, `python -m unclip_jax.main`) share the cache too. Tiny
    # programs compile in milliseconds: caching them costs more disk reads than it saves.
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

# Orbax saves a replicated array in slices, one per device (replica-parallel saving): with 8
# fake devices that compiles a slicing program for every parameter shape at a stage's first
# save (about 300 in the tiny main job). The tests save each array from one replica instead.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)

# The module that trains the tiny main job runs first (its tests need it at once); the other
# users of `tiny_run` run midway, when the other worker has long finished training it and
# enough modules remain to keep both workers busy to the end.
TINY_RUN_BUILDER = "tests/recipes/test_shapes_recipe.py"


def _module(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """One xdist group per test module (its module fixtures are built once), in the order: the
    tiny main job's builder, half the other modules, its other users, the rest (xdist runs
    groups in this order with --no-loadscope-reorder, from pytest.ini)."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_module(item)))
    users = {_module(i) for i in items if "tiny_run" in getattr(i, "fixturenames", ())}
    others = list(dict.fromkeys(_module(i) for i in items if _module(i) not in users))
    half = set(others[:len(others) // 2])

    def rank(item):
        module = _module(item)
        if module == TINY_RUN_BUILDER:
            return 0
        return 1 if module in half else 2 if module in users else 3
    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """The main job on experiments/shapes.py:smoke, trained once per test session and shared by
    the recipe, sampling and evaluation tests of every xdist worker (a file lock in the session's
    shared temporary folder: the first worker to ask trains it, another waits for it):
    (config, workdir, run_pipeline's result)."""
    from filelock import FileLock

    from experiments import shapes
    from unclip_jax.recipes.shapes import run_pipeline

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # every worker's basetemp lives in the session's folder
    root = shared / "tiny_run"
    cfg = shapes.get_config("smoke")
    cfg.data.data_dir = str(root / "data")
    wd = str(root / "run")
    result_file = root / "result.json"
    with FileLock(str(shared / "tiny_run.lock")):
        if not result_file.exists():
            result = run_pipeline(cfg, wd)
            result_file.write_text(json.dumps(result))
    return cfg, wd, json.loads(result_file.read_text())
