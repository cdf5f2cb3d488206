"""Orbax checkpoints with resume: train state (sharded), config, and each process's data position.

Layout under the workdir:
  checkpoints/<step>/{state,meta}     Orbax (async; a step dir appears only once finalised)
  data_state/<step>/process_<i>.json  the input iterator's position, written *before* the Orbax
                                      save starts, so every finalised step has one
  corrupt_checkpoints/<step>-<time>/  steps that failed to restore, moved aside (never deleted)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.ckpt_dir = os.path.join(self.workdir, "checkpoints")
        self.data_dir = os.path.join(self.workdir, "data_state")
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.mgr = ocp.CheckpointManager(self.ckpt_dir, options=self._options)

    # -- saving ------------------------------------------------------------------------------
    def save(self, step: int, state, data_state, config_json: str, *, force: bool = False) -> bool:
        self._write_data_state(step, data_state)
        saved = self.mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"step": int(step), "config": json.loads(config_json)}),
            ),
            force=force,
        )
        self._prune_data_states()
        return saved

    def _write_data_state(self, step, data_state):
        d = os.path.join(self.data_dir, str(step))
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"process_{jax.process_index()}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data_state, f)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def _prune_data_states(self):
        if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
            return
        kept = self.mgr.all_steps()
        if not kept:
            return
        oldest = min(kept)
        for name in os.listdir(self.data_dir):
            if name.isdigit() and int(name) < oldest:
                shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()

    # -- restoring ---------------------------------------------------------------------------
    def latest_step(self):
        return self.mgr.latest_step()

    def all_steps(self):
        return sorted(self.mgr.all_steps())

    def restore_latest(self, abstract_state):
        """(state, data_state, step) from the newest checkpoint that restores, else None.

        A checkpoint whose files cannot be read (truncated or corrupt, missing data position) is
        logged, moved to corrupt_checkpoints/ and the previous one is tried. A checkpoint that
        reads fine but holds another state layout (the config changed the optimiser chain or
        the model) is not corruption: that raises, and no checkpoint is touched. If every
        checkpoint is corrupt this raises too, rather than silently starting from step 0."""
        steps = sorted(self.mgr.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                meta = ocp.StandardCheckpointer().metadata(
                    os.path.join(self.ckpt_dir, str(step), "state")).item_metadata
                if meta is None:
                    raise ValueError("no readable tree metadata")
                saved = _tree_shapes(meta)
                if not saved or "" in saved:
                    raise ValueError("empty tree metadata")
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
                saved, err = None, e
            if saved is not None:
                want = _tree_shapes(abstract_state)
                if saved != want:
                    diff = sorted(set(saved.items()) ^ set(want.items()))
                    raise ValueError(
                        f"checkpoint at step {step} in {self.ckpt_dir} holds a different train "
                        f"state layout than this config builds ({len(diff)} leaves differ, e.g. "
                        + ", ".join(f"{k} {v}" for k, v in diff[:4]) + "): the optimiser "
                        "(e.g. optim.grad_clip, optim.ema_decay) or model changed. Resume with "
                        "the config it was trained with, or use a new --workdir; the "
                        "checkpoints are left untouched")
                try:
                    data_state = self._read_data_state(step)
                    restored = self.mgr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))
                    return restored["state"], data_state, step
                except Exception as e:  # noqa: BLE001 - layout matched, so the files are bad
                    err = e
            logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                            "moving it to corrupt_checkpoints/ and trying the previous one",
                            step, self.ckpt_dir, type(err).__name__, str(err)[:500])
            errors.append(f"step {step}: {type(err).__name__}: {str(err)[:200]}")
            self._quarantine(step)
        if errors:
            raise RuntimeError(
                f"none of the checkpoints in {self.ckpt_dir} could be restored; they were moved "
                f"to {os.path.join(self.workdir, 'corrupt_checkpoints')} (nothing deleted). "
                "Re-run to start this stage from step 0, or restore them by hand:\n  "
                + "\n  ".join(errors))
        return None

    def _read_data_state(self, step):
        path = os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no data iterator position for step {step}: {path}")
        with open(path) as f:
            return json.load(f)

    def _quarantine(self, step):
        if jax.process_index() == 0:
            dest = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            src = os.path.join(self.ckpt_dir, str(step))
            if os.path.exists(src):
                shutil.move(src, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.mgr.reload()


def read_config_json(workdir: str, step: int | None = None) -> dict:
    """The config saved with a checkpoint (latest when step is None), without restoring arrays."""
    mgr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                    save_interval_steps=0))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return meta["config"]


def _tree_shapes(tree) -> dict:
    """{'a/b/c': shape} of a pytree's leaves (arrays, ShapeDtypeStructs or Orbax metadata)."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass
class Trained:
    """A trained stage loaded for inference: its config, stage, module and (EMA) params."""
    config: Any
    stage: Any
    model: Any
    params: Any
    step: int
    workdir: str


def load_trained(workdir: str, *, ema: bool = True, step: int | None = None,
                 sharding=None) -> Trained:
    """Load a stage's parameters (EMA by default) and config from a training workdir.

    Read-only: nothing in the workdir is created, moved or changed. A checkpoint that fails to
    load is skipped with a warning in favour of the previous one."""
    import flax.linen as nn
    import ml_collections

    from unclip_jax.stages import get_stage

    workdir = os.path.abspath(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory: train this stage first "
                                f"(python -m unclip_jax.main --config=... --workdir={workdir})")
    # save_interval_steps=0: what read_only implies (Orbax warns on every load otherwise).
    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt_dir} (have {steps})")
        steps = [step]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (an interrupted first save "
                                "leaves none): train this stage first")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    key = "ema_params" if ema else "params"
    errors = []
    for s in steps:
        try:
            meta = mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            config = ml_collections.ConfigDict(meta["config"])
            stage = get_stage(config.stage)
            model = stage.build_model(config)
            example = {k: v for k, v in stage.example_batch(config, 1).items()
                       if getattr(v, "dtype", None) is not None and v.dtype.kind not in "USO"}
            abstract = jax.eval_shape(
                lambda r: nn.meta.unbox(stage.init(model, r, example))["params"],
                jax.random.PRNGKey(0))
            item = {key: jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)}
            restored = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item),
                partial_restore=True)))
            mgr.close()
            return Trained(config, stage, model, restored["state"][key], s, workdir)
        except Exception as e:  # noqa: BLE001 - try the previous checkpoint
            logging.warning("checkpoint step %d in %s cannot be loaded (%s: %s); trying an "
                            "earlier one", s, ckpt_dir, type(e).__name__, str(e)[:300])
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
    mgr.close()
    raise RuntimeError(f"no checkpoint in {ckpt_dir} could be loaded:\n  " + "\n  ".join(errors))
