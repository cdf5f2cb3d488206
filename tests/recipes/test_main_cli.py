"""The `python -m unclip_jax.main` entry point: overrides, early config errors, resume."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", UNCLIP_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "unclip_jax.main",
                           f"--config={ROOT}/experiments/toy.py", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_trains_then_resumes_without_retraining(tmp_path):
    wd = str(tmp_path / "run")
    r = _main(f"--workdir={wd}", "--config.train.num_steps=6", "--config.train.log_every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done at step 6 (resumed from 0)" in r.stdout
    r = _main(f"--workdir={wd}", "--config.train.num_steps=6", "--config.train.log_every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done at step 6 (resumed from 6)" in r.stdout


def test_cli_bad_override_fails_before_compiling(tmp_path):
    wd = tmp_path / "bad"
    r = _main(f"--workdir={wd}", "--config.optim.lr=-0.5")
    assert r.returncode != 0
    assert "config.optim.lr: must be > 0" in r.stderr
    assert not (wd / "checkpoints").exists()
