"""One path layer for every path a user gives (workdir, data, caches, outputs, weights): a local
path or an object-store URL (gs://bucket/dir, and the other stores etils.epath reaches through
fsspec, e.g. gcsfs). Orbax uses the same layer for checkpoints.

  path(p)          -> epath.Path (local paths made absolute, URLs kept as they are)
  glob(pattern)    -> sorted matching paths, as strings (`gs://b/shards/*.tar` works)
  atomic_write(p)  -> a file object that writes p whole (readers never see half a file)
  write_text, write_bytes, save_npy, save_npz: whole files through atomic_write
  np_load(p)       -> np.load of a whole file
  read_range(p, start, n) -> n bytes of a file from `start` (on object stores: one ranged read)
  upload(local, url), remove_tree(p), check_bucket(url) (a missing bucket named by the URL)
  local_file(p), local_dir(p[, recursive]) -> a local copy of p, for readers that take only
                                 local files (memory-mapped arrays, tokenizer libraries)
"""
from __future__ import annotations

import atexit
import contextlib
import glob as _glob
import hashlib
import os
import re
import shutil
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



def _fs(p):
    """(filesystem, path within it) of a URL: the fsspec instance epath itself uses, so that
    what this module writes is seen at once by every epath call of this process (a second
    instance would keep its own stale listing cache)."""
    fs = epath.backend.fsspec_backend.fs(str(p))
    return fs, fs._strip_protocol(str(p))


def refresh(p) -> None:
    """Forget the cached listings of `p` and its parents: another process may have written
    there since this one listed it (gcsfs answers `exists` from its listing cache)."""
    if is_url(p):
        _fs(p)[0].invalidate_cache(_fs(p)[1])

@contextlib.contextmanager
def atomic_write(p, mode: str = "wb"):
    """A file object to write `p` whole: a reader sees the old file or the new one, never half
    of it, also when the writer dies. Locally a temporary name renamed into place; on object
    stores a local temporary file uploaded in one request when the block ends (an object store
    commits an object only once its upload completes)."""
    p = path(p)
    if is_url(p):
        fd, tmp = tempfile.mkstemp(prefix="unclip_jax_upload_")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            _put(tmp, p)
        finally:
            os.remove(tmp)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(p, text: str) -> None:
    """Write a whole text file (atomic_write)."""
    with atomic_write(p, "w") as f:
        f.write(text)


def write_bytes(p, data: bytes) -> None:
    with atomic_write(p) as f:
        f.write(data)


def save_npy(p, arr) -> None:
    """np.save to a local path or URL (atomic_write)."""
    import numpy as np
    with atomic_write(p) as f:
        np.save(f, arr)


def save_npz(p, **arrays) -> None:
    """np.savez to a local path or URL, the name kept as given (atomic_write)."""
    import numpy as np
    with atomic_write(p) as f:
        np.savez(f, **arrays)


def read_range(p, start: int, n: int) -> bytes:
    """Bytes [start, start + n) of a file (fewer at its end): on object storage one ranged
    request, not a buffered file object (which reads ahead a block of megabytes)."""
    if not is_url(p):   # (no epath.Path: it costs more than the read, per example)
        with open(os.path.expanduser(os.fspath(p)), "rb") as f:
            return os.pread(f.fileno(), n, start)
    fs, target = _fs(p)
    return fs.cat_file(target, start=start, end=start + n)


def np_load(p):
    """np.load of a whole .npy / .npz file, local or on object storage (read into memory; for a
    memory-mapped array use np.load(local_file(p), mmap_mode=...))."""
    import io

    import numpy as np
    if not is_url(p):
        return np.load(os.fspath(path(p)))
    return np.load(io.BytesIO(path(p).read_bytes()))


def _put(local: str, url: str) -> None:
    """Upload one file; a missing bucket is named by the URL (the client's own message names
    only its request)."""
    fs, target = _fs(url)
    try:
        fs.put_file(local, target)
    except FileNotFoundError as e:
        check_bucket(url)
        raise FileNotFoundError(f"cannot write {url}: {e}") from e


def check_bucket(p) -> None:
    """Raise FileNotFoundError naming `p` when it is a URL whose bucket does not exist (or
    cannot be seen with these credentials); writing there would fail late, or (Orbax) wait for
    a timeout."""
    if not is_url(p):
        return
    scheme, rest = str(p).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if not epath.Path(bucket).exists():
        raise FileNotFoundError(f"{p}: bucket {bucket} does not exist (or is not visible with "
                                "these credentials)")


def upload(local: str, url: str) -> None:
    """Copy a local file, or a directory's files (recursively), to `url`."""
    url = str(url).rstrip("/")
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(root, name), local)
                _put(os.path.join(root, name), f"{url}/{rel.replace(os.sep, '/')}")
    else:
        _put(local, url)


def remove_tree(p) -> None:
    """Delete the file or directory `p` (local or on object storage) with everything under it;
    nothing when it does not exist."""
    if not is_url(p):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
        return
    refresh(p)
    fs, target = _fs(p)
    if fs.exists(target):
        fs.rm(target, recursive=True)


_mirror: str | None = None


def _mirror_dir() -> str:
    """This process's local folder of downloaded copies (removed when the process exits)."""
    global _mirror
    if _mirror is None:
        _mirror = tempfile.mkdtemp(prefix="unclip_jax_mirror_")
        atexit.register(shutil.rmtree, _mirror, ignore_errors=True)
    return _mirror


def local_file(p) -> str:
    """`p` itself when local; else a local copy of the object, downloaded once per process and
    version (URL, size and modification time), for readers that need a local file (np.load with
    mmap_mode, libraries that open paths themselves)."""
    if not is_url(p):
        return os.fspath(path(p))
    src = epath.Path(str(p))
    if not src.exists():
        raise FileNotFoundError(f"{p} does not exist")
    st = src.stat()
    key = hashlib.sha1(f"{p}|{st.length}|{st.mtime}".encode()).hexdigest()[:20]
    dst = os.path.join(_mirror_dir(), f"{key}_{src.name}")
    if not os.path.exists(dst):
        fs, target = _fs(p)
        tmp = f"{dst}.tmp{os.getpid()}"
        fs.get_file(target, tmp)
        os.replace(tmp, dst)
    return dst


def local_dir(p, recursive: bool = False) -> str:
    """`p` itself when local; else a local copy of the directory's files (with `recursive`, its
    sub-folders' too), for readers that only take local paths (Hugging Face tokenizers and
    weights, array_record files, a diffusers pipeline folder), downloaded once per process and
    version (URL, every file's name, size and modification time)."""
    if not is_url(p):
        return os.fspath(path(p))
    src = epath.Path(str(p))
    if not src.is_dir():
        raise FileNotFoundError(f"{p} is not a directory")
    if recursive:   # epath's gs:// rglob refuses "**" (one request per folder, as here)
        files, todo = [], [src]
        while todo:
            for f in todo.pop().iterdir():
                (todo if f.is_dir() else files).append(f)
        files.sort(key=str)
    else:
        files = sorted((f for f in src.iterdir() if not f.is_dir()), key=lambda f: f.name)
    stats = [(os.path.relpath(str(f), str(src)), f.stat()) for f in files]
    key = hashlib.sha1("|".join([str(p)] + [f"{n}:{st.length}:{st.mtime}" for n, st in stats])
                       .encode()).hexdigest()[:20]
    dst = os.path.join(_mirror_dir(), f"{key}_{src.name}")
    if not os.path.exists(dst):
        fs, _ = _fs(p)
        tmp = f"{dst}.tmp{os.getpid()}"
        os.makedirs(tmp)
        for f, (rel, _) in zip(files, stats):
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            fs.get_file(_fs(f)[1], os.path.join(tmp, rel))
        os.replace(tmp, dst)
    return dst
