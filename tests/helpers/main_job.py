"""`python -m unclip_jax.main` with the test session's JAX set-up (tests/conftest.py: 8 fake CPU
devices, the tests' persistent compilation cache, Orbax saving each array from one replica), so
a run in a subprocess reuses the programs the session compiled and computes the same numbers.

  python tests/helpers/main_job.py [--kill_after=STAGE:STEP] <flags of unclip_jax.main>

--kill_after: the process kills itself (SIGKILL: no clean-up runs) as soon as stage STAGE's
checkpoint STEP is committed; a deterministic point, where a kill from outside would race the
steps after it.
"""
import os
import runpy
import signal
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kill_after(stage: str, step: int) -> None:
    from unclip_jax.train import checkpoint
    save = checkpoint.Checkpointer.save

    def save_then_kill(self, s, *args, **kwargs):
        out = save(self, s, *args, **kwargs)
        if s == step and self.workdir.name == stage:
            self.wait()   # committed: what a resume finds
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    checkpoint.Checkpointer.save = save_then_kill


def main(argv):
    kill = [a for a in argv if a.startswith("--kill_after=")]
    rest = [a for a in argv if a not in kill]
    sys.path[:0] = [TESTS, os.path.dirname(TESTS)]   # conftest, helpers; experiments
    import conftest  # noqa: F401 - the session's JAX and Orbax set-up (imports JAX)

    from unclip_jax.tools import host_malloc
    host_malloc.prepare_cpu_host = lambda: None   # conftest set the XLA flags; JAX is imported
    if kill:
        stage, step = kill[0].split("=", 1)[1].split(":")
        _kill_after(stage, int(step))
    sys.argv = ["unclip_jax.main"] + rest
    runpy.run_module("unclip_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
