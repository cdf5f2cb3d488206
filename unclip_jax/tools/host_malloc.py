"""The host allocator for XLA:CPU: tcmalloc when it is installed, else glibc with huge pages.

XLA:CPU asks malloc for large blocks from its worker threads on every step: the executable's
temporaries, one block per call (0.9 GB for the CPU bench U-Net's train step), and Eigen's packed
operands for each convolution (~76 MB for a 32x32, 64-channel convolution at batch 32). glibc
serves a block over 32 MiB asked for by a worker thread with a fresh mmap and unmaps it at free.
So every step the kernel zeroes and faults in ~3.7 GB of new pages (perf: clear_page), a large
share of a CPU U-Net step's time, where PyTorch's step spends little time in the kernel.

Two remedies, the first one found is used:
- gperftools' tcmalloc (`apt-get install libtcmalloc-minimal4` on Debian/Ubuntu), preloaded: it
  keeps freed blocks mapped and hands them out again, so a step's blocks are neither zeroed nor
  faulted again. The fastest of the allocators tried, for the U-Net step and the main job.
- glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35+, kernel THP mode `madvise`): the fresh
  blocks come in 2 MiB pages, so the faults (237k per step in 4 KiB pages) go; the zeroing stays.
  Faster than plain glibc, slower than tcmalloc.
jemalloc and mimalloc (Debian's builds, default settings) were slower than either: they return
large freed blocks to the kernel at once. Dated figures: docs/cpu-performance-2026-11.md.

Both act only from process start (the dynamic loader reads LD_PRELOAD, glibc its tunables). So a
command started as `python -m unclip_jax.<tool>` on a CPU host re-executes itself once, with the
setting added, when its entry point calls `prepare_cpu_host` (before JAX is imported). A program
or test that imports unclip_jax is never re-executed: set the variables yourself there.
`python -m unclip_jax.tools.hardware` says what applies and why. UNCLIP_JAX_MALLOC chooses: auto
(default), tcmalloc, hugepages, off.

The same entry-point setup pins JAX to the CPU (JAX_PLATFORMS=cpu) on a host with no accelerator
device node and no cluster environment, when the user set no platform: otherwise JAX also starts
every installed plugin, and libtpu (in the test extra) prints TPU start-up errors on a CPU host.
"""
from __future__ import annotations

import glob
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# XLA:CPU's YNN fusion of single convolutions is slower than Eigen's convolutions for our U-Nets
# (about 2x on the CPU U-Net step); the flag touches only the CPU backend.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MARK = "_UNCLIP_JAX_REEXECUTED"
MODES = ("auto", "tcmalloc", "hugepages", "off")
# tcmalloc prints a line for every allocation over this size (default 1 GiB): XLA's temp block
# for a large step is one, on every step.
TCMALLOC_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
_TCMALLOC_GLOBS = tuple(f"{d}/libtcmalloc{kind}.so.4" for kind in ("_minimal", "")
                        for d in ("/usr/lib*", "/usr/lib*/*-linux-gnu", "/usr/local/lib*"))
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


def glibc_version() -> str:
    """'2.36' for glibc 2.36; '' for another C library or OS."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return ""
    return version if name == "glibc" else ""


def find_tcmalloc(environ=os.environ) -> str:
    """Path of gperftools' tcmalloc: UNCLIP_JAX_TCMALLOC if set, else the first system copy
    found (conda's in $CONDA_PREFIX/lib too); '' if none."""
    if environ.get("UNCLIP_JAX_TCMALLOC"):
        return environ["UNCLIP_JAX_TCMALLOC"]
    patterns = list(_TCMALLOC_GLOBS)
    if environ.get("CONDA_PREFIX"):
        patterns.insert(0, os.path.join(environ["CONDA_PREFIX"], "lib", "libtcmalloc*.so.4"))
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return ""


def allocator(environ=os.environ) -> str:
    """What this process allocates with: 'tcmalloc', 'glibc+hugepages', 'glibc', or what the user
    preloaded."""
    preload = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return "tcmalloc"
    if preload:
        return f"preloaded: {preload}"
    return "glibc+hugepages" if TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":") else "glibc"


def _started_as_tool(argv) -> bool:
    argv = list(argv or [])
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("unclip_jax.")


def accelerator_present() -> bool:
    """Whether this host has a GPU or TPU device node (JAX would compute there, not on the CPU)."""
    return any(glob.glob(p) for p in _ACCELERATOR_NODES)


def choose(environ=os.environ, argv=None, *, tcmalloc=None, glibc=None, thp=None,
           accelerator=None, jax_imported=None) -> tuple[str | None, str]:
    """(remedy, reason): remedy is 'tcmalloc' or 'hugepages' when this process should re-execute
    itself with it, None when it should run as it is; reason says why. The keyword arguments
    stand in for what is otherwise read off this host (for tests)."""
    argv = getattr(sys, "orig_argv", sys.argv) if argv is None else argv
    mode = environ.get("UNCLIP_JAX_MALLOC", "auto").strip().lower() or "auto"
    if mode in ("0", "false", "no", "none"):
        mode = "off"
    if mode not in MODES:
        raise ValueError(f"UNCLIP_JAX_MALLOC={environ['UNCLIP_JAX_MALLOC']!r}: use one of {MODES}")
    if mode == "off":
        return None, "disabled by UNCLIP_JAX_MALLOC=off"
    if environ.get(MARK):
        return None, f"already re-executed once ({allocator(environ)})"
    if not _started_as_tool(argv):
        return None, "not started as `python -m unclip_jax.<tool>`"
    if environ.get("LD_PRELOAD") or "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return None, "the user chose the allocator or its settings (LD_PRELOAD / GLIBC_TUNABLES)"
    if sys.platform != "linux":
        return None, "not Linux"
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",")
                 if p.strip()]
    if platforms and platforms[0] != "cpu":
        return None, f"JAX_PLATFORMS={environ['JAX_PLATFORMS']} (not the CPU)"
    if not platforms and (accelerator_present() if accelerator is None else accelerator):
        return None, "an accelerator device node exists (JAX will not compute on the CPU)"
    if ("jax" in sys.modules) if jax_imported is None else jax_imported:
        return None, "JAX is already imported"
    if mode in ("auto", "tcmalloc"):
        path = find_tcmalloc(environ) if tcmalloc is None else tcmalloc
        if path:
            return "tcmalloc", f"tcmalloc at {path}"
        if mode == "tcmalloc":
            return None, ("UNCLIP_JAX_MALLOC=tcmalloc but no tcmalloc was found (apt-get install "
                          "libtcmalloc-minimal4, or set UNCLIP_JAX_TCMALLOC to its path)")
    # Huge pages: asked for by name, or auto on a host without tcmalloc.
    no_tc = "no tcmalloc found, and " if mode == "auto" else ""
    version = glibc_version() if glibc is None else glibc
    if not version:
        return None, f"{no_tc}not glibc"
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return None, f"{no_tc}glibc {version} has no malloc.hugetlb tunable (2.35+)"
    thp_now = thp_mode() if thp is None else thp
    if thp_now != "madvise":
        return None, (f"{no_tc}transparent huge pages are '{thp_now}' "
                      "(only 'madvise' needs the tunable)")
    return "hugepages", f"{no_tc}glibc with transparent huge pages"


def reexec_environment(remedy: str, environ=os.environ, *, tcmalloc=None) -> dict:
    """The environment to re-execute with for `remedy` ('tcmalloc' or 'hugepages')."""
    env = dict(environ)
    if remedy == "tcmalloc":
        env["LD_PRELOAD"] = find_tcmalloc(environ) if tcmalloc is None else tcmalloc
        for k, v in TCMALLOC_ENV.items():
            env.setdefault(k, v)
    else:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    env[MARK] = "1"
    return env


def reexec() -> None:
    """Replace this process by the same command with the chosen allocator, when `choose` says so."""
    remedy, why = choose()
    if remedy is None:
        if "no tcmalloc was found" in why:  # asked for by name: say why it is not used
            print(f"unclip_jax: {why}", file=sys.stderr)
        return
    env = reexec_environment(remedy)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def set_cpu_flags(environ=os.environ) -> None:
    """Add CPU_CONV_FLAG to XLA_FLAGS unless the user set that option (read at backend start)."""
    if "xla_cpu_experimental_ynn_fusion_type" not in environ.get("XLA_FLAGS", ""):
        environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + CPU_CONV_FLAG).strip()


def default_platform(environ=os.environ, *, accelerator=None) -> str | None:
    """'cpu' when JAX should be pinned to the CPU: the user set no JAX_PLATFORMS (nor the older
    JAX_PLATFORM_NAME), the host has no accelerator device node and no cluster environment
    (`distributed.cluster_detected`); else None."""
    if environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME"):
        return None
    from unclip_jax import distributed  # imports no JAX
    if distributed.cluster_detected(environ):
        return None
    return None if (accelerator_present() if accelerator is None else accelerator) else "cpu"


def prepare_cpu_host() -> None:
    """What a command-line entry point does first, before JAX is imported: JAX_PLATFORMS=cpu on a
    CPU-only host (`default_platform`), the XLA:CPU flags, then re-execution with the chosen
    allocator (see `choose`). Never called on import."""
    if "jax" in sys.modules:
        # A bug in the entry point: the allocator can no longer change, nor the platform.
        print("unclip_jax: prepare_cpu_host() called after JAX was imported: the host setup "
              "has no effect", file=sys.stderr)
    platform = default_platform()
    if platform:
        os.environ["JAX_PLATFORMS"] = platform
    set_cpu_flags()
    reexec()
