"""Transparent huge pages for XLA:CPU's buffers, through glibc malloc's `hugetlb` tunable.

XLA:CPU allocates an executable's temporaries as one block per call (0.9 GB for the CPU bench
U-Net's train step). glibc maps a block that large afresh on every call and the step then
first-touches it in 4 KiB pages: 237k page faults and 0.37 s of kernel time per 1.2 s step on the
2-core dev host, and every kernel of the step runs on 4 KiB pages. With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc asks the kernel for transparent huge pages (2 MiB)
on the memory it maps (the kernel must allow them on request: THP mode `madvise`). Measured on
that host: the CPU bench U-Net step 1.23 -> 1.06 s, the shapes decoder / diffusion prior / CLIP
steps 15% / 18% / 33% faster (README "Benchmarks"); PyTorch's step did not change with it.

glibc reads tunables only when a process starts. So a command started as
`python -m unclip_jax.<tool>` re-executes itself once, with the tunable added, when the package is
imported (before JAX is). A program or test that imports unclip_jax is never re-executed: set the
variable yourself there. `python -m unclip_jax.hardware` says what applies and why.
UNCLIP_JAX_HUGEPAGES=0 turns it off.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
MARK = "_UNCLIP_JAX_REEXECUTED"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/kfd", "/dev/vfio/[0-9]*")


def thp_mode(path: str = _THP) -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'unknown'."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"


def _started_as_tool(argv) -> bool:
    argv = list(argv or [])
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("unclip_jax.")


def glibc_version() -> str:
    """'2.36' for glibc 2.36; '' for another C library or OS."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return ""
    return version if name == "glibc" else ""


def _accelerator_present() -> bool:
    import glob
    return any(glob.glob(p) for p in _ACCELERATOR_NODES)


def active(environ=os.environ) -> bool:
    """True when this process runs with glibc's huge-page tunable."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def why_not(environ=os.environ, argv=None, *, glibc=None, thp=None, accelerator=None,
            jax_imported=None) -> str | None:
    """Why this process should not re-execute itself with huge pages, or None if it should.
    The keyword arguments stand in for what is otherwise read off this host (for tests)."""
    argv = getattr(sys, "orig_argv", sys.argv) if argv is None else argv
    if environ.get("UNCLIP_JAX_HUGEPAGES", "1").lower() in ("0", "false", "off", "no"):
        return "disabled by UNCLIP_JAX_HUGEPAGES"
    if active(environ):
        return "already on (GLIBC_TUNABLES)"
    if environ.get(MARK):
        return "already re-executed once"
    if not _started_as_tool(argv):
        return "not started as `python -m unclip_jax.<tool>`"
    version = glibc_version() if glibc is None else glibc
    if sys.platform != "linux" or not version:
        return "not Linux with glibc"
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return f"glibc {version} has no malloc.hugetlb tunable (2.35+)"
    mode = thp_mode() if thp is None else thp
    if mode != "madvise":
        return f"transparent huge pages are '{mode}' (only 'madvise' needs the tunable)"
    if environ.get("LD_PRELOAD") or "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "the user chose the allocator or its settings (LD_PRELOAD / GLIBC_TUNABLES)"
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms[0] != "cpu":
        return f"JAX_PLATFORMS={environ['JAX_PLATFORMS']} (not the CPU)"
    if not platforms and (_accelerator_present() if accelerator is None else accelerator):
        return "an accelerator device node exists (JAX will not compute on the CPU)"
    if ("jax" in sys.modules) if jax_imported is None else jax_imported:
        return "JAX is already imported"
    return None


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set, when `why_not` allows."""
    if why_not() is not None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    env[MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
