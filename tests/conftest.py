"""Every test sees 8 fake CPU devices, so mesh code is exercised without accelerators."""
from unclip_jax.tools import host_malloc

host_malloc.set_cpu_flags()  # the flags the command-line tools run with

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The main job on experiments/shapes.py:smoke, trained once per test session (worker) and
    shared by the pipeline and evaluation tests: (config, workdir, run_pipeline's result)."""
    from unclip_jax.recipes.shapes import run_pipeline

    from helpers.trainer import load_config
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("shapes.py", "smoke")
    cfg.data.data_dir = str(root / "data")
    wd = str(root / "run")
    return cfg, wd, run_pipeline(cfg, wd)
