"""Orbax checkpoints with resume: train state (sharded), config, and the job's data position.

Layout under the workdir (a local path or an object-store URL such as gs://bucket/run):
  checkpoints/<step>/{state,meta,data}   Orbax (async; a step appears only once committed).
                                         `data` is the data position: examples consumed by the
                                         whole job, the process count, and each process's
                                         iterator state (exact resume on the same count)
  corrupt_checkpoints/<step>-<time>/     steps that every process agreed cannot be restored,
                                         moved aside by process 0 (never deleted)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from unclip_jax import distributed
from unclip_jax.paths import path as workdir_path


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.workdir = workdir_path(workdir)
        self.ckpt_dir = self.workdir / "checkpoints"
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.mgr = ocp.CheckpointManager(self.ckpt_dir, options=self._options)

    # -- saving ------------------------------------------------------------------------------
    def save(self, step: int, state, data_state, config_json: str, *, examples: int,
             force: bool = False) -> bool:
        """Save the train state with the job's data position: `examples` consumed by the whole
        job and this process's iterator state (gathered from every process on the host side)."""
        states = distributed.host_values(f"data position {step}", data_state)
        position = {"examples": int(examples), "process_count": jax.process_count(),
                    "processes": states}
        return self.mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"step": int(step), "config": json.loads(config_json)}),
                data=ocp.args.JsonSave(position),
            ),
            force=force,
        )

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
        """(state, data position, step) from the newest checkpoint that restores, else None.

        Whether a checkpoint is corrupt is decided by all processes together: each tries it,
        they exchange verdicts, and if any failed every process moves on to the previous one
        (process 0 moves the bad one to corrupt_checkpoints/; nothing is deleted). A checkpoint
        that reads fine but holds another state layout (the config changed the optimiser chain
        or the model) is not corruption: that raises, and no checkpoint is touched. If every
        checkpoint is corrupt this raises too, rather than silently starting from step 0."""
        steps = sorted(self.mgr.all_steps(), reverse=True)
        errors = []
        for step in steps:
            err, layout = None, None
            try:
                with ocp.StandardCheckpointer() as reader:
                    meta = reader.metadata(self.ckpt_dir / str(step) / "state").item_metadata
                if meta is None:
                    raise ValueError("no readable tree metadata")
                saved = _tree_shapes(meta)
                if not saved or "" in saved:
                    raise ValueError("empty tree metadata")
                want = _tree_shapes(abstract_state)
                if saved != want:
                    diff = sorted(set(saved.items()) ^ set(want.items()))
                    layout = (
                        f"checkpoint at step {step} in {self.ckpt_dir} holds a different train "
                        f"state layout than this config builds ({len(diff)} leaves differ, e.g. "
                        + ", ".join(f"{k} {v}" for k, v in diff[:4]) + "): the optimiser "
                        "(e.g. optim.grad_clip, optim.ema_decay) or model changed. Resume with "
                        "the config it was trained with, or use a new --workdir; the "
                        "checkpoints are left untouched")
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
                err = e
            restored = None
            if err is None and layout is None:
                try:
                    position = self._read_position(step)
                    restored = self.mgr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state)))["state"]
                except Exception as e:  # noqa: BLE001 - layout matched, so the files are bad
                    err = e
            mine = ("layout", layout) if layout else (
                ("error", f"{type(err).__name__}: {str(err)[:300]}") if err else ("ok", ""))
            verdicts = distributed.host_values(f"restore {step}", mine)
            bad_layout = next((m for v, m in verdicts if v == "layout"), None)
            if bad_layout:
                raise ValueError(bad_layout)
            failed = [(i, m) for i, (v, m) in enumerate(verdicts) if v == "error"]
            if not failed:
                return restored, position, step
            why = "; ".join(f"process {i}: {m}" for i, m in failed[:3])
            logging.warning("checkpoint at step %d in %s cannot be restored (%s); moving it to "
                            "corrupt_checkpoints/ and trying the previous one",
                            step, self.ckpt_dir, why)
            errors.append(f"step {step}: {why[:300]}")
            self._quarantine(step)
        if errors:
            raise RuntimeError(
                f"none of the checkpoints in {self.ckpt_dir} could be restored; they were moved "
                f"to {self.workdir / 'corrupt_checkpoints'} (nothing deleted). "
                "Re-run to start this stage from step 0, or restore them by hand:\n  "
                + "\n  ".join(errors))
        return None

    def _read_position(self, step) -> dict:
        if not (self.ckpt_dir / str(step) / "data").exists():
            return self._read_legacy_position(step)
        return self.mgr.restore(step, args=ocp.args.Composite(
            data=ocp.args.JsonRestore()))["data"]

    def _read_legacy_position(self, step) -> dict:
        # Checkpoints written before the position moved into the checkpoint kept one file per
        # process beside it: usable on the same process count only.
        d = self.workdir / "data_state" / str(step)
        files = sorted(d.glob("process_*.json")) if d.exists() else []
        if not files:
            raise FileNotFoundError(f"no data position for step {step} (neither "
                                    f"{self.ckpt_dir / str(step) / 'data'} nor {d})")
        states = [json.loads((d / f"process_{i}.json").read_text()) for i in range(len(files))]
        return {"examples": None, "process_count": len(files), "processes": states}

    def _quarantine(self, step):
        # Called by every process after the same collective verdict; only process 0 moves.
        if jax.process_index() == 0:
            dest = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = self.ckpt_dir / str(step)
            if src.exists():
                src.rename(dest)
        distributed.host_values(f"moved {step}", True)
        self.mgr.reload()


def read_config_json(workdir: str, step: int | None = None) -> dict:
    """The config saved with a checkpoint (latest when step is None), without restoring arrays."""
    mgr = ocp.CheckpointManager(workdir_path(workdir) / "checkpoints",
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


@functools.lru_cache(maxsize=32)
def _abstract_params(config_json: str):
    """The parameter shapes of a stage's model for its config (JSON): traced once per process
    for every load of the same config (a Flax init traces as long as a forward pass)."""
    import flax.linen as nn
    import ml_collections

    from unclip_jax.stages import get_stage
    config = ml_collections.ConfigDict(json.loads(config_json))
    stage = get_stage(config.stage)
    model = stage.build_model(config)
    example = {k: v for k, v in stage.example_batch(config, 1).items()
               if getattr(v, "dtype", None) is not None and v.dtype.kind not in "USO"}
    return jax.eval_shape(lambda r: nn.meta.unbox(stage.init(model, r, example))["params"],
                          jax.random.PRNGKey(0))


def load_trained(workdir: str, *, ema: bool = True, step: int | None = None,
                 sharding=None) -> Trained:
    """Load a stage's parameters (EMA by default) and config from a training workdir.

    Read-only: nothing in the workdir is created, moved or changed. A checkpoint that fails to
    load is skipped with a warning in favour of the previous one."""
    import ml_collections

    from unclip_jax.stages import get_stage

    workdir = workdir_path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not ckpt_dir.is_dir():
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
            abstract = _abstract_params(json.dumps(meta["config"], sort_keys=True))
            item = {key: jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)}
            restored = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item),
                partial_restore=True)))
            mgr.close()
            return Trained(config, stage, model, restored["state"][key], s, str(workdir))
        except Exception as e:  # noqa: BLE001 - try the previous checkpoint
            logging.warning("checkpoint step %d in %s cannot be loaded (%s: %s); trying an "
                            "earlier one", s, ckpt_dir, type(e).__name__, str(e)[:300])
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
    mgr.close()
    raise RuntimeError(f"no checkpoint in {ckpt_dir} could be loaded:\n  " + "\n  ".join(errors))
