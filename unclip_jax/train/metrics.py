"""Metric sinks: JSON lines and TensorBoard in the workdir (process 0 only).

On object storage (gs://...), where a file cannot be appended to, metrics.jsonl is rewritten
whole at most every `UPLOAD_EVERY_S` seconds and at close; TensorBoard uploads its own file."""
from __future__ import annotations

import json
import os
import time

import jax

from unclip_jax import paths

UPLOAD_EVERY_S = 30.0


# tensorboardX's optional back ends, imported when installed: torch (for torch tensors), S3, GCS.
_TB_UNUSED = ("torch", "boto3", "google.cloud.storage")


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without its optional back ends (with PyTorch
    installed, they cost about 5 s of CPU at every job's start): this package gives it numpy
    values and local folders only (a gs:// workdir's event files are staged locally). Modules
    already imported are left as they are."""
    import sys
    blocked = [] if "tensorboardX" in sys.modules else [m for m in _TB_UNUSED
                                                          if m not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked))   # None: `import m` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        for m in blocked:
            del sys.modules[m]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool | None = None, resume_step: int = 0):
        """`resume_step`: the checkpoint step training resumes from. Rows logged after it by the
        interrupted run are dropped, since the resumed run logs those steps again."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._remote, self._rows, self._uploaded = None, [], 0.0
        if self.enabled:
            wd = paths.path(workdir)
            wd.mkdir(parents=True, exist_ok=True)
            SummaryWriter = summary_writer_class()
            if paths.is_url(wd):
                import tempfile
                self._remote = wd / "metrics.jsonl"
                old = self._remote.read_text().splitlines(True) if self._remote.exists() else []
                self._rows = _kept(old, int(resume_step))
                # TensorBoard's event files are staged locally and uploaded whole with the rows.
                self._tb_local = tempfile.mkdtemp(prefix="unclip_jax_tb_")
                self._tb = SummaryWriter(self._tb_local)
                return
            self._tb = SummaryWriter(os.fspath(wd / "tensorboard"))
            path = os.fspath(wd / "metrics.jsonl")
            _truncate_after(path, int(resume_step))
            self._jsonl = open(path, "a")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._remote is not None:
            self._rows.append(line)
            if time.monotonic() - self._uploaded > UPLOAD_EVERY_S:
                self._upload()
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, int(step))

    def _upload(self):
        self._remote.write_text("".join(self._rows))
        self._tb.flush()
        tb = self._remote.parent / "tensorboard"
        tb.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self._tb_local):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                (tb / name).write_bytes(f.read())
        self._uploaded = time.monotonic()

    def close(self):
        if self.enabled:
            self._tb.close()
            if self._remote is not None:
                self._upload()
                import shutil
                shutil.rmtree(self._tb_local, ignore_errors=True)
            else:
                self._jsonl.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = _kept(lines, step)
    if len(keep) != len(lines):
        paths.write_text(path, "".join(keep))


def _kept(lines: list[str], step: int) -> list[str]:
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line of a killed run
    return keep
