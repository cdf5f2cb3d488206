"""Test session set-up: 8 fake CPU devices, a persistent XLA compilation cache, and scheduling that
builds every expensive fixture once.

- Every test sees 8 fake CPU devices, so mesh code is exercised without accelerators.
- Compiled programs go to JAX's persistent cache (UNCLIP_JAX_TEST_CACHE, default
  ~/.cache/unclip_jax/xla-tests; "off" disables it), so a repeated run skips most XLA compiles.
- Under xdist (`-n 2`, with `--dist loadgroup` from pytest.ini) each test module runs on one
  worker, so its module-scoped fixtures are built once; every test that uses the trained tiny
  main job (`tiny_run`) runs on the same worker, which trains it once per session. Those tests
  are scheduled first, since they are the longest chain.
"""
import os

from unclip_jax.tools import host_malloc

host_malloc.set_cpu_flags()  # the flags the command-line tools run with

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

_CACHE = os.environ.get("UNCLIP_JAX_TEST_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax", "xla-tests"))
if _CACHE.lower() not in ("", "0", "off", "none"):
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    # Tiny programs compile in milliseconds: caching them costs more disk reads than it saves.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

TINY_RUN_GROUP = "tiny_run"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """One xdist group per test module, one for every user of `tiny_run`; those first."""
    for item in items:
        group = (TINY_RUN_GROUP if "tiny_run" in getattr(item, "fixturenames", ())
                 else item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda it: "tiny_run" not in getattr(it, "fixturenames", ()))  # stable


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The main job on experiments/shapes.py:smoke, trained once per test session and shared by
    the recipe, sampling and evaluation tests: (config, workdir, run_pipeline's result)."""
    from experiments import shapes
    from unclip_jax.recipes.shapes import run_pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = shapes.get_config("smoke")
    cfg.data.data_dir = str(root / "data")
    wd = str(root / "run")
    return cfg, wd, run_pipeline(cfg, wd)
