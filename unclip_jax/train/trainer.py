"""One trainer for every stage: mesh, sharded state, jitted step, Orbax checkpoints, resume.

    train(config, workdir)  ->  summary dict

Sections: config checks | mesh | model and state | input | step | checkpoint/resume | loop.
Re-running on the same workdir resumes from the latest complete checkpoint; SIGTERM saves first.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import parallel, paths
from unclip_jax.stages import get_stage
from unclip_jax.train.checkpoint import Checkpointer
from unclip_jax.train.metrics import MetricWriter
from unclip_jax.train.optim import SCHEDULES, learning_rate_schedule, make_optimizer
from unclip_jax.train.state import count_params, prepare_state
from unclip_jax.train.step import make_train_step


class NonFiniteError(FloatingPointError):
    pass


# ---------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong is reported before anything compiles.
def validate_config(config, stage=None, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
    def need(cond, field, msg):
        if not cond:
            raise ValueError(f"config.{field}: {msg}")

    t, o = config.train, config.optim
    need(int(t.num_steps) > 0, "train.num_steps", f"must be > 0, got {t.num_steps}")
    need(int(t.batch_size) > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    need(int(t.grad_accum) >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    need(int(t.batch_size) % int(t.grad_accum) == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    need(int(t.log_every) > 0, "train.log_every", f"must be > 0, got {t.log_every}")
    need(int(t.ckpt_every) > 0, "train.ckpt_every", f"must be > 0, got {t.ckpt_every}")
    need(int(t.keep) >= 1, "train.keep", f"must be >= 1, got {t.keep}")
    need(int(t.max_bad_steps) >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    need(float(o.lr) > 0 and math.isfinite(float(o.lr)), "optim.lr", f"must be > 0, got {o.lr}")
    need(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
    need(0 <= int(o.warmup_steps), "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(0.0 <= float(o.b1) < 1.0, "optim.b1", f"must be in [0, 1), got {o.b1}")
    need(0.0 <= float(o.b2) < 1.0, "optim.b2", f"must be in [0, 1), got {o.b2}")
    need(float(o.eps) > 0, "optim.eps", f"must be > 0, got {o.eps}")
    need(float(o.weight_decay) >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(float(o.grad_clip) >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    need(0.0 <= float(o.ema_decay) < 1.0, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
    if num_devices is not None:
        ici, dcn = parallel.mesh_shape(config.mesh, num_devices)  # raises naming mesh fields
        dp = ici[0] * ici[1] * dcn[0] * dcn[1]
        micro = int(t.batch_size) // int(t.grad_accum)
        need(micro % dp == 0, "train.batch_size",
             f"micro-batch {micro} (batch_size / grad_accum) must divide evenly over the "
             f"{dp} data-parallel devices (mesh data x fsdp)")
    if process_count is not None:
        need(int(t.batch_size) % process_count == 0, "train.batch_size",
             f"{t.batch_size} is not divisible by the {process_count} processes")
    parallel.rules_from_config(config)
    if stage is not None:
        stage.validate(config)


# ---------------------------------------------------------------------------------------------
class _Preemption:
    """A preemption notice (SIGTERM) stops the loop after a step, with a save, on every host.

    Several processes: JAX's coordination service receives the notice on whichever host gets it
    and agrees with all hosts on the step to stop at (`reached_preemption_sync_point`): a host
    lookup, no device sync. One process: a SIGTERM handler sets a flag."""

    def __init__(self):
        from jax._src import distributed as jd
        self.flag = False
        self._old = None
        self.coordinated = (jax.process_count() > 1
                            and jd.global_state.preemption_sync_manager is not None)
        # In a coordinated job the service owns SIGTERM; a Python handler would take it away.
        if not self.coordinated and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint before exit")
        self.flag = True

    def reached(self, step: int) -> bool:
        from jax.experimental import multihost_utils
        if self.coordinated:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            # The preemption service is off (jax_enable_preemption_service=False): share the
            # flags every step, a host allgather (and a device sync).
            flags = multihost_utils.process_allgather(np.asarray([self.flag], np.int32))
            return bool(np.asarray(flags).any())
        return self.flag

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def resume_data(data, position: dict, start: int, global_batch: int) -> int:
    """Put this process's iterator where the job left off; returns the examples consumed.

    On the process count that wrote the position each process takes back its own iterator state.
    On another count the iterators are re-derived from the job's global position
    (`seek(examples, process_count)`); the data readers' training order does not depend on the
    count (unclip_jax.data.loader), so both resume exactly."""
    n = jax.process_count()
    examples = position.get("examples")
    if examples is None:  # an old checkpoint: per-process states only
        examples = start * global_batch
        if position["process_count"] != n:
            raise ValueError(
                f"the checkpoint at step {start} keeps its data position per process (an older "
                f"layout), written by {position['process_count']} processes: resume it on "
                f"{position['process_count']} processes (not {n}) once, after which any count "
                "works")
    if position["process_count"] == n:
        data.set_state(position["processes"][jax.process_index()])
    elif hasattr(data, "seek"):
        logging.info("resuming %d-process data position on %d processes at example %d",
                     position["process_count"], n, examples)
        data.seek(int(examples), n)
    else:
        raise ValueError(f"this stage's data iterator ({type(data).__name__}) cannot resume on "
                         f"{n} processes what {position['process_count']} wrote (it has no "
                         "seek(examples, process_count))")
    return int(examples)


def _numeric(batch: dict) -> dict:
    # Strings (captions) stay on the host; stages tokenise them in make_data.
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype != object and v.dtype.kind not in "USO"}


def _global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


@dataclasses.dataclass
class StepBundle:
    """Everything needed to run (or only compile) a stage's sharded train step on a mesh."""
    stage: Any
    model: Any
    tx: Any
    mesh: Any
    rules: Any
    abstract_state: Any      # ShapeDtypeStructs with shardings (nothing allocated)
    shardings: Any
    init: Callable[[], Any]  # allocates the state, sharded
    step: Callable           # jitted (state, batch) -> (state, metrics); donates the state
    batch_sharding: Any
    example: dict            # a 1-example numeric batch (shapes and dtypes)

    def abstract_batch(self, global_batch: int) -> dict:
        return {k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype,
                                        sharding=self.batch_sharding)
                for k, v in self.example.items()}


def build_step(config, mesh=None) -> StepBundle:
    """Stage, model, optimiser, sharded state spec and jitted train step for `config`.

    Shared by training, benchmarks and ahead-of-time compilation, so all three measure the same
    program."""
    stage = get_stage(config.stage)
    mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
    rules = parallel.rules_from_config(config)
    data_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    model = stage.build_model(config)
    tx = make_optimizer(config.optim, int(config.train.num_steps))
    example = _numeric(stage.example_batch(config, 1))
    abstract, shardings, init = prepare_state(stage, model, tx, config, mesh, rules, example)
    step_fn = make_train_step(stage, model, tx, config, rules)
    batch_sh = {k: data_sharding for k in example}
    with jax.set_mesh(mesh):
        jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                         donate_argnums=(0,))
    return StepBundle(stage, model, tx, mesh, rules, abstract, shardings, init, jitted,
                      data_sharding, example)


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
    """Train `config.stage` to `config.train.num_steps` (or stop early at `stop_at`, as if
    interrupted there). Returns a summary: final step, last metrics, params count, state."""
    stage = get_stage(config.stage)
    parallel.split_cpu_devices(config.mesh)
    n_dev = int(config.mesh.num_devices) or jax.device_count()
    validate_config(config, stage, n_dev, jax.process_count())
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    check_same_model(config, workdir)
    b = build_step(config)
    mesh, data_sharding, abstract, init = b.mesh, b.batch_sharding, b.abstract_state, b.init
    num_steps = int(config.train.num_steps)
    jitted = b.step
    lr_at = learning_rate_schedule(config.optim, num_steps)

    # -- checkpoint / resume ------------------------------------------------------------------
    ckpt = Checkpointer(workdir, keep=int(config.train.keep),
                        async_save=bool(config.train.async_checkpoint))
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, position, start = restored
        logging.info("resumed from step %d in %s", start, workdir)
    else:
        state, position, start = init(), None, 0
    n_params = count_params(state.params)

    # -- input --------------------------------------------------------------------------------
    local_bs = int(config.train.batch_size) // jax.process_count()
    data = stage.make_data(config, split="train", process_index=jax.process_index(),
                           process_count=jax.process_count(), local_batch_size=local_bs,
                           seed=int(config.seed))
    global_bs = int(config.train.batch_size)
    examples = 0 if position is None else resume_data(data, position, start, global_bs)

    # -- loop ---------------------------------------------------------------------------------
    writer = MetricWriter(workdir, resume_step=start)
    config_json = config.to_json_best_effort()
    if jax.process_index() == 0:
        paths.write_text(paths.path(workdir) / "config.json", config_json)
    preempt = _Preemption()
    end = num_steps if stop_at is None else min(num_steps, int(stop_at))
    pbar = None
    if jax.process_index() == 0:
        from tqdm import tqdm
        pbar = tqdm(total=num_steps, initial=start, desc=f"{config.stage}", dynamic_ncols=True,
                    disable=bool(int(os.environ.get("UNCLIP_NO_PROGRESS", "0"))))
    step = start
    last_metrics: dict = {}
    pending = None
    t_window, n_window = None, 0
    status = "done"
    log_every, ckpt_every = int(config.train.log_every), int(config.train.ckpt_every)
    max_bad = int(config.train.max_bad_steps)
    n_dev = mesh.devices.size
    try:
        while step < end:
            batch = _global_batch(_numeric(next(data)), data_sharding)
            with jax.set_mesh(mesh):
                state, metrics = jitted(state, batch)
            step += 1
            examples += global_bs
            if pending is not None:  # previous step's verdict: fetched while this one runs
                _check_bad(pending, max_bad, step - 1)
            pending = metrics
            if t_window is None:
                jax.block_until_ready(metrics["loss"])  # first step includes compilation
                t_window, n_window = time.perf_counter(), 0
            else:
                n_window += 1
            if pbar is not None:
                pbar.update(1)
            if step % log_every == 0 or step == end:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_bad(host, max_bad, step)
                dt = time.perf_counter() - t_window
                if n_window > 0:
                    sps = n_window / dt
                    host.update(steps_per_s=sps,
                                examples_per_s=sps * int(config.train.batch_size),
                                examples_per_s_per_device=sps * int(config.train.batch_size) / n_dev)
                    t_window, n_window = time.perf_counter(), 0
                host["lr"] = float(lr_at(step))
                host["examples"] = examples
                host.update({f"data/{k}": float(v) for k, v in data.stats().items()})
                writer.write(step, host)
                last_metrics = host
                if pbar is not None:
                    pbar.set_postfix(loss=f"{host['loss']:.4g}")
            if preempt.reached(step):
                ckpt.save(step, state, data.get_state(), config_json, examples=examples, force=True)
                status = "preempted"
                break
            if step % ckpt_every == 0 and step < end:
                ckpt.save(step, state, data.get_state(), config_json, examples=examples)
        if pending is not None:
            _check_bad({k: float(v) for k, v in jax.device_get(pending).items()}, max_bad, step)
        if status == "done" and step > start and step not in ckpt.all_steps():
            ckpt.save(step, state, data.get_state(), config_json, examples=examples, force=True)
    finally:
        ckpt.close()
        writer.close()
        preempt.restore()
        if pbar is not None:
            pbar.close()
    if status == "done" and step >= num_steps:
        stage.after_training(config, workdir, b, state, step)
    return {"step": step, "status": status, "metrics": last_metrics, "params": n_params,
            "state": state, "mesh": mesh, "resumed_from": start,
            "examples": examples}


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_same_model(config, workdir: str) -> None:
    """Refuse to resume a workdir whose checkpoints hold another stage or architecture: restoring
    would fail (or, worse, silently mismatch); the existing checkpoints are left untouched."""
    path = paths.path(workdir) / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    now = json.loads(config.to_json_best_effort())
    diffs = _diff({"stage": saved.get("stage"), "model": saved.get("model")},
                  {"stage": now.get("stage"), "model": now.get("model")})
    if diffs:
        raise ValueError(f"workdir {workdir} holds a run with a different stage/model config ("
                         + "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                         + "); use a new --workdir, or the config it was trained with")


def _check_bad(metrics, max_bad: int, step: int):
    bad = int(metrics["bad_steps"])
    if bad >= max_bad:
        raise NonFiniteError(
            f"stopping at step {step}: {bad} non-finite steps in a row (train.max_bad_steps="
            f"{max_bad}); parameters were not updated by them, the last checkpoint is intact")
    if bad:
        logging.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, bad)
