"""One path layer for every path a user gives (workdir, data, caches, outputs, weights): a local
path or an object-store URL (gs://bucket/dir, and the other stores etils.epath reaches through
fsspec, e.g. gcsfs). Orbax uses the same layer for checkpoints.

  path(p)       -> epath.Path (local paths made absolute, URLs kept as they are)
  glob(pattern) -> sorted matching paths, as strings (`gs://b/shards/*.tar` works)
  local_dir(p)  -> a local directory holding p's files, for libraries that read only local files
"""
from __future__ import annotations

import glob as _glob
import os
import re
import tempfile

from etils import epath

_WILDCARD = re.compile(r"[*?\[]")


def is_url(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    s = os.fspath(p) if not isinstance(p, str) else p
    return epath.Path(s) if is_url(s) else epath.Path(os.path.abspath(os.path.expanduser(s)))


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (wildcards in any component after the first)."""
    if not is_url(pattern):
        return sorted(_glob.glob(os.path.expanduser(pattern)))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    if fixed == len(parts):
        return [pattern] if epath.Path(pattern).exists() else []
    base = epath.Path(f"{scheme}://" + "/".join(parts[:fixed]))
    if not base.exists():
        return []
    return sorted(str(p) for p in base.glob("/".join(parts[fixed:])))


def write_text(p, text: str) -> None:
    """Write a whole file; no reader sees half of it (a rename locally, one object upload on
    object stores, where writes are atomic)."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_url(p):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, p)


def local_dir(p) -> str:
    """`p` itself when local; else a copy of the directory's files (not sub-folders) in a local
    temporary directory, for readers that only take local paths (e.g. Hugging Face tokenizers)."""
    if not is_url(p):
        return os.fspath(path(p))
    src = epath.Path(str(p))
    if not src.is_dir():
        raise FileNotFoundError(f"{p} is not a directory")
    dst = tempfile.mkdtemp(prefix="unclip_jax_")
    for f in src.iterdir():
        if not f.is_dir():
            (epath.Path(dst) / f.name).write_bytes(f.read_bytes())
    return dst
