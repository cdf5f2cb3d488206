"""Metric sinks: JSON lines and TensorBoard in the workdir (process 0 only)."""
from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, int(step))

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
