"""Train any stage from an experiment config.

  python -m unclip_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR [--config.x.y=v]

Re-running the same command on the same workdir resumes from its latest checkpoint. Multi-host:
TPU pods and SLURM are detected; otherwise pass --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: XLA:CPU flags and the allocator


from absl import app, flags, logging
from ml_collections import config_flags

from unclip_jax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str):
    """A whole-stack config (`pipeline` field) runs every stage; otherwise one stage trains."""
    if "pipeline" in config:
        from unclip_jax.recipes.shapes import run_pipeline
        return run_pipeline(config, workdir)
    from unclip_jax.train.trainer import train
    return train(config, workdir)


def main(argv):
    del argv
    if FLAGS["verbosity"].using_default_value:
        # Orbax logs every save step at INFO; keep the console to the progress bar and warnings.
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    summary = run(FLAGS.config, FLAGS.workdir)
    import jax
    if jax.process_index() == 0 and "metrics" in summary:
        m = summary["metrics"]
        print(f"{summary['status']} at step {summary['step']} (resumed from "
              f"{summary['resumed_from']}): loss {m.get('loss', float('nan')):.4g}, "
              f"{summary['params']:,} params, workdir {FLAGS.workdir}")


if __name__ == "__main__":
    app.run(main)
