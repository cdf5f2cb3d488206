"""Every experiments/**/*.py config, in each of its variants, passes its stage's validation and
holds every field the stage reads (builders hold the defaults, the code reads `config.x`).

Cheap: nothing compiles; the stages build batch shapes and (U-Nets) the Flax module object.
"""
import importlib
import pathlib
import re

import pytest

from unclip_jax.stages import get_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _variants(path: pathlib.Path) -> list:
    """None plus every variant name the file compares `arg` with."""
    text = path.read_text()
    names = set(re.findall(r'arg == "(\w+)"', text))
    for group in re.findall(r"arg (?:not )?in \(([^)]*)\)", text):
        names.update(re.findall(r'"(\w+)"', group))
    return [None] + sorted(names)


def _cases():
    for path in sorted((ROOT / "experiments").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for arg in _variants(path):
            yield pytest.param(module, arg, id=f"{module}:{arg or ''}")


def _stage_configs(config) -> dict:
    """name -> stage config: the config itself, or each stage of a whole-stack config as the
    recipe trains it (data and paths between stages filled in)."""
    if "pipeline" in config:
        from unclip_jax.recipes.shapes import stage_configs
        return stage_configs(config, "runs/unused")
    if "stage" in config:
        return {config.stage: config}
    return {}


@pytest.mark.parametrize("module,arg", list(_cases()))
def test_experiment_config_validates(module, arg):
    config = importlib.import_module(module).get_config(arg)
    if "embed" in config and "stage" not in config and "pipeline" not in config:
        # an embedding-cache job (python -m unclip_jax.embed): its data and encoder factory
        from unclip_jax.data import NAMES
        assert config.data.name in NAMES
        module_name, factory = config.embed.encoder.split(":")
        assert callable(getattr(importlib.import_module(module_name), factory))
        return
    stages = _stage_configs(config)
    if not stages:  # an evaluation config: its checks and sampling settings
        from unclip_jax.eval import plan
        if plan.wants_inception(config) and not config.inception_weights:
            with config.unlocked():  # a user's local file; only its presence is checked here
                config.inception_weights = "/weights/pt_inception.npz"
        plan.check_config(config)
        assert plan.sample_settings(config).decoder_guidance > 0
        return
    for name, c in stages.items():
        stage = get_stage(c.stage)
        assert c.stage == name
        stage.validate(c)
        batch = stage.example_batch(c, 2)
        assert all(v.shape[0] == 2 for v in batch.values())
