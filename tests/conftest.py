"""Every test sees 8 fake CPU devices, so mesh code is exercised without accelerators."""
import unclip_jax  # noqa: F401  (sets XLA CPU flags before the backend starts)

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The main job on experiments/shapes.py:tiny, trained once per test session (worker) and
    shared by the pipeline and evaluation tests: (config, workdir, run_pipeline's result)."""
    from unclip_jax.pipeline_train import run_pipeline

    from trainer_util import load_config
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("shapes.py", "tiny")
    cfg.data.data_dir = str(root / "data")
    wd = str(root / "run")
    return cfg, wd, run_pipeline(cfg, wd)
