"""unclip_jax.tools.host_malloc: `python -m unclip_jax.<tool>` re-executes itself with an allocator that
does not map XLA:CPU's large per-call blocks afresh on every call (tcmalloc if installed, else
glibc's huge-page tunable)."""
import functools
import json
import os
import subprocess
import sys

import pytest
from conftest import TEST_XLA_FLAGS

from unclip_jax.tools import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = ["python", "-m", "unclip_jax.tools.bench", "--config=x.py"]
TC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
GOOD = dict(tcmalloc="", glibc="2.36", thp="madvise", accelerator=False, jax_imported=False)
_OURS = ("GLIBC_TUNABLES", "LD_PRELOAD", "UNCLIP_JAX_MALLOC", "UNCLIP_JAX_TCMALLOC",
         "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", host_malloc.MARK)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    # XLA's default optimisation: the probe runs its program 11 times and compiles it once, so
    # the tests' compile-speed flags (tests/conftest.py) would double its CPU time.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not any(k in f for k in TEST_XLA_FLAGS))
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _hardware_probe(*flags, **extra):
    out = subprocess.run([sys.executable, "-m", "unclip_jax.tools.hardware", *flags],
                         env=_clean_env(**extra), capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_command_runs_with_the_allocator_chosen_for_this_host():
    """`python -m unclip_jax.tools.hardware` (no JAX import: cheap) reports the allocator it runs
    with, which is what `choose` picks for a command on this host."""
    remedy, _ = host_malloc.choose(_clean_env(), TOOL, jax_imported=False)
    got = _hardware_probe()
    want = {"tcmalloc": "tcmalloc", "hugepages": "glibc+hugepages", None: "glibc"}[remedy]
    assert got["allocator"] == want and got["reexecuted"] == (remedy is not None), got
    if host_malloc.find_tcmalloc({}):  # libtcmalloc-minimal4 installed: it is the one used
        assert got["allocator"] == "tcmalloc", got


def test_cpu_only_hosts_pin_jax_to_the_cpu():
    """No accelerator node, no cluster, nothing set: JAX_PLATFORMS=cpu, so libtpu (installed with
    the test extra) is not started on a CPU host; anything else is left to JAX."""
    pick = host_malloc.default_platform
    assert pick({}, accelerator=False) == "cpu"
    assert pick({}, accelerator=True) is None
    assert pick({"JAX_PLATFORMS": "cuda"}, accelerator=False) is None
    assert pick({"JAX_PLATFORMS": ""}, accelerator=False) == "cpu"
    assert pick({"JAX_PLATFORM_NAME": "tpu"}, accelerator=False) is None
    assert pick({"SLURM_NTASKS": "4"}, accelerator=False) is None
    assert pick({"SLURM_NTASKS": "1"}, accelerator=False) == "cpu"
    assert pick({"TPU_WORKER_HOSTNAMES": "h0,h1"}, accelerator=False) is None


@functools.cache
def _probe_off():
    """The probe without a remedy (glibc, 4 KiB pages): the baseline of both modes below."""
    return _hardware_probe("--probe", UNCLIP_JAX_MALLOC="off")


@pytest.mark.parametrize("mode", ["auto", "hugepages"])
def test_tool_reexecutes_with_the_allocator_and_faults_less(mode):
    remedy, why = host_malloc.choose(_clean_env(UNCLIP_JAX_MALLOC=mode), TOOL, jax_imported=False)
    got = _hardware_probe("--probe", UNCLIP_JAX_MALLOC=mode)
    if remedy is None:
        # A host where neither remedy applies (no tcmalloc, no THP on request): runs as it is.
        assert got["allocator"] == "glibc" and not got["reexecuted"] and got["why"] == why, got
        return
    assert got["reexecuted"], got
    assert got["temp_pages"] >= 128 * 2**20 / 4096
    if remedy == "tcmalloc":
        # The 128 MiB temp block freed by one call is handed to the next: no page touched anew.
        assert got["allocator"] == "tcmalloc", got
        assert got["faults_per_call"] < 0.01 * got["temp_pages"], got
    else:
        # 2 MiB pages: ~64 faults per call for the block, not one per 4 KiB page.
        assert got["allocator"] == "glibc+hugepages", got
        assert got["faults_per_call"] < 0.05 * got["temp_pages"], got
    off = _probe_off()
    assert off["allocator"] == "glibc" and not off["reexecuted"]
    assert off["why"] == "disabled by UNCLIP_JAX_MALLOC=off"
    assert off["faults_per_call"] > 0.9 * off["temp_pages"], off


def test_only_cpu_tools_are_reexecuted_and_tcmalloc_comes_first():
    choose = host_malloc.choose
    assert choose({}, TOOL, **{**GOOD, "tcmalloc": TC}) == ("tcmalloc", f"tcmalloc at {TC}")
    assert choose({}, TOOL, **GOOD)[0] == "hugepages"
    assert choose({}, ["python", "-u", "-m", "unclip_jax.main"], **GOOD)[0] == "hugepages"
    assert choose({"UNCLIP_JAX_MALLOC": "hugepages"}, TOOL, **{**GOOD, "tcmalloc": TC})[0] \
        == "hugepages"
    # Asked for tcmalloc where there is none: the tool runs as it is and says why.
    remedy, why = choose({"UNCLIP_JAX_MALLOC": "tcmalloc"}, TOOL, **GOOD)
    assert remedy is None and "no tcmalloc was found" in why
    # Programs and tests that import the package are never re-executed.
    for argv in (["python", "-c", "import x"], ["python", "-m", "pytest"], ["python", "-m"]):
        assert choose({}, argv, **GOOD) == (None, "not started as `python -m unclip_jax.<tool>`")
    assert choose({}, TOOL, **{**GOOD, "jax_imported": True})[1] == "JAX is already imported"
    # Once only, and never against the user's own choices.
    assert choose({host_malloc.MARK: "1", "LD_PRELOAD": TC}, TOOL, **GOOD) \
        == (None, "already re-executed once (tcmalloc)")
    assert choose({"UNCLIP_JAX_MALLOC": "off"}, TOOL, **{**GOOD, "tcmalloc": TC}) \
        == (None, "disabled by UNCLIP_JAX_MALLOC=off")
    assert choose({"UNCLIP_JAX_MALLOC": "0"}, TOOL, **GOOD)[0] is None
    assert "LD_PRELOAD" in choose({"LD_PRELOAD": "libjemalloc.so.2"}, TOOL, **GOOD)[1]
    assert "GLIBC_TUNABLES" in choose({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, TOOL,
                                      **GOOD)[1]
    # Hosts where huge pages cannot or need not work, and accelerator hosts.
    assert "2.35+" in choose({}, TOOL, **{**GOOD, "glibc": "2.31"})[1]
    assert choose({}, TOOL, **{**GOOD, "glibc": ""}) == (None, "no tcmalloc found, and not glibc")
    assert "'never'" in choose({}, TOOL, **{**GOOD, "thp": "never"})[1]
    assert "'always'" in choose({}, TOOL, **{**GOOD, "thp": "always"})[1]
    assert choose({"UNCLIP_JAX_MALLOC": "hugepages"}, TOOL, **{**GOOD, "glibc": "2.31"})[1] \
        == "glibc 2.31 has no malloc.hugetlb tunable (2.35+)"
    assert choose({}, TOOL, **{**GOOD, "thp": "always", "tcmalloc": TC})[0] == "tcmalloc"
    assert "not the CPU" in choose({"JAX_PLATFORMS": "cuda"}, TOOL, **{**GOOD, "tcmalloc": TC})[1]
    assert "accelerator" in choose({}, TOOL, **{**GOOD, "accelerator": True})[1]
    assert choose({"JAX_PLATFORMS": "cpu"}, TOOL, **{**GOOD, "accelerator": True})[0] \
        == "hugepages"
    with pytest.raises(ValueError, match="UNCLIP_JAX_MALLOC='jemalloc'"):
        choose({"UNCLIP_JAX_MALLOC": "jemalloc"}, TOOL, **GOOD)


def test_tcmalloc_asked_for_but_missing_is_reported(monkeypatch, capsys):
    why = "UNCLIP_JAX_MALLOC=tcmalloc but no tcmalloc was found (...)"
    monkeypatch.setattr(host_malloc, "choose", lambda: (None, why))
    host_malloc.reexec()  # returns: nothing to re-execute with
    assert capsys.readouterr().err == f"unclip_jax: {why}\n"
    monkeypatch.setattr(host_malloc, "choose", lambda: (None, "JAX is already imported"))
    host_malloc.reexec()
    assert capsys.readouterr().err == ""


def test_reexec_environment_and_allocator_names():
    env = host_malloc.reexec_environment("tcmalloc", {"PATH": "/bin"}, tcmalloc=TC)
    assert env["LD_PRELOAD"] == TC and env[host_malloc.MARK] == "1" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) == 1 << 40
    mine = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "123"}
    assert host_malloc.reexec_environment("tcmalloc", mine, tcmalloc=TC)[
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "123"
    env = host_malloc.reexec_environment("hugepages", {"GLIBC_TUNABLES": "glibc.rtld.x=1"})
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.x=1:" + host_malloc.TUNABLE
    assert "LD_PRELOAD" not in env
    assert host_malloc.allocator(env) == "glibc+hugepages"
    assert host_malloc.allocator({"LD_PRELOAD": TC}) == "tcmalloc"
    assert host_malloc.allocator({"LD_PRELOAD": "/x/libjemalloc.so.2"}) \
        == "preloaded: /x/libjemalloc.so.2"
    assert host_malloc.allocator({}) == "glibc"


def test_host_readings(tmp_path):
    assert host_malloc.glibc_version() == (
        os.confstr("CS_GNU_LIBC_VERSION").split()[1] if sys.platform == "linux" else "")
    # The kernel's THP mode is the bracketed choice.
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_malloc.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert host_malloc.thp_mode(str(f)) == "always"
    assert host_malloc.thp_mode(str(tmp_path / "missing")) == "unknown"
    # tcmalloc: the user's path first, then conda's, then the system's.
    assert host_malloc.find_tcmalloc({"UNCLIP_JAX_TCMALLOC": "/opt/tc.so"}) == "/opt/tc.so"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert host_malloc.find_tcmalloc({"CONDA_PREFIX": str(tmp_path)}) \
        == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")
    system = host_malloc.find_tcmalloc({})
    assert system == "" or (os.path.exists(system) and "libtcmalloc" in system)
