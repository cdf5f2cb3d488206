"""Train one stage, or the whole unCLIP stack, from an experiment config.

  python -m unclip_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR [--config.x.y=v]

A config with a `pipeline` field (experiments/shapes.py, experiments/webdata.py) trains every
stage in order, then samples and writes a report or an evaluation (unclip_jax/recipes/runner.py,
with the config's `recipe`); any other config trains its one stage (a `:smoke` variant with
`smoke_data` first makes its tiny input under DIR: unclip_jax.stages.smoke). Re-running the same command
on the same workdir resumes from its latest checkpoint. The terminal shows one line per stage, a
progress bar per training stage and the final report; library logging goes to DIR/log.txt, the
metrics to DIR/metrics.jsonl and DIR/tensorboard. Multi-host: TPU pods and SLURM are detected;
otherwise pass --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

from unclip_jax.tools import host_malloc

if __name__ == "__main__":
    host_malloc.prepare_cpu_host()  # before JAX is imported: it takes effect only then

# Nothing below imports JAX at module level: it is imported in main, after the host setup.
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def run(config, workdir: str):
    """A whole-stack config (`pipeline` field) runs every stage; otherwise one stage trains."""
    if "pipeline" in config:
        from unclip_jax.recipes.runner import run_pipeline
        return run_pipeline(config, workdir)
    from unclip_jax.train.trainer import train
    from unclip_jax import console
    if config.get("smoke_data"):   # a :smoke variant makes its own tiny input first
        from unclip_jax.stages import smoke
        config = smoke.prepare(config, workdir)
    console.say(f"[{config.stage}] training {config.train.num_steps} steps in {workdir}")
    return train(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from unclip_jax import console, distributed
    console.quiet_terminal()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import jax
    from absl import logging
    log = console.log_to_file(FLAGS.workdir, jax.process_index())
    logging.info("process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    summary = run(FLAGS.config, FLAGS.workdir)
    if "metrics" in summary:
        m = summary["metrics"]
        trained = (f"loss {m['loss']:.4g}" if "loss" in m else "nothing left to train")
        console.say(f"{summary['status']} at step {summary['step']} (resumed from "
             f"{summary['resumed_from']}): {trained}, {summary['params']:,} params, "
             f"workdir {FLAGS.workdir} (log: {log})")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config), "
                                    "e.g. experiments/toy.py or experiments/shapes.py:smoke.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the "
                        "log; an existing one is resumed.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process "
                        "runs without a detected cluster).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                         "--coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.mark_flags_as_required(["config", "workdir"])
    from unclip_jax import console
    console.run_app(main)
