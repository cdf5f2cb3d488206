"""unclip_jax.host_malloc: `python -m unclip_jax.<tool>` re-executes itself with glibc's huge-page
tunable, so XLA:CPU's per-call temp buffer is faulted in 2 MiB pages instead of 4 KiB ones."""
import json
import os
import subprocess
import sys

from unclip_jax import host_malloc

TOOL = ["python", "-m", "unclip_jax.bench", "--config=x.py"]
GOOD = dict(glibc="2.36", thp="madvise", accelerator=False, jax_imported=False)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "UNCLIP_JAX_HUGEPAGES", host_malloc.MARK)}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _hardware_probe(**extra):
    out = subprocess.run([sys.executable, "-m", "unclip_jax.hardware", "--probe"],
                         env=_clean_env(**extra), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tool_reexecutes_with_huge_pages_and_faults_less():
    expected = host_malloc.why_not(_clean_env(), TOOL, jax_imported=False)
    on = _hardware_probe()
    if expected is not None:
        # A host without THP on request (or without glibc 2.35+): the tool runs as it is.
        assert not on["huge_pages"] and not on["reexecuted"] and on["why_not"] == expected
        return
    assert on["huge_pages"] and on["reexecuted"], on
    assert on["temp_pages"] >= 128 * 2**20 / 4096
    # 2 MiB pages: the 128 MiB temp block costs ~64 faults per call, not one per 4 KiB page.
    assert on["faults_per_call"] < 0.05 * on["temp_pages"], on
    off = _hardware_probe(UNCLIP_JAX_HUGEPAGES="0")
    assert not off["huge_pages"] and not off["reexecuted"]
    assert off["why_not"] == "disabled by UNCLIP_JAX_HUGEPAGES"
    assert off["faults_per_call"] > 0.9 * off["temp_pages"], off


def test_only_cpu_tools_with_thp_on_request_are_reexecuted():
    assert host_malloc.why_not({}, TOOL, **GOOD) is None
    assert host_malloc.why_not({}, ["python", "-u", "-m", "unclip_jax.main"], **GOOD) is None
    # Programs and tests that import the package are never re-executed.
    assert "not started as" in host_malloc.why_not({}, ["python", "-c", "import x"], **GOOD)
    assert "not started as" in host_malloc.why_not({}, ["python", "-m", "pytest"], **GOOD)
    assert "not started as" in host_malloc.why_not({}, ["python", "-m"], **GOOD)
    assert "already imported" in host_malloc.why_not({}, TOOL, **{**GOOD, "jax_imported": True})
    # Once only, and never against the user's own choices.
    assert host_malloc.why_not({"GLIBC_TUNABLES": host_malloc.TUNABLE}, TOOL, **GOOD) \
        == "already on (GLIBC_TUNABLES)"
    assert host_malloc.why_not({host_malloc.MARK: "1"}, TOOL, **GOOD) == "already re-executed once"
    assert host_malloc.why_not({"UNCLIP_JAX_HUGEPAGES": "off"}, TOOL, **GOOD) \
        == "disabled by UNCLIP_JAX_HUGEPAGES"
    assert "LD_PRELOAD" in host_malloc.why_not({"LD_PRELOAD": "libjemalloc.so.2"}, TOOL, **GOOD)
    assert "GLIBC_TUNABLES" in host_malloc.why_not(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, TOOL, **GOOD)
    # Hosts where it cannot or need not work, and accelerator hosts.
    assert "2.35+" in host_malloc.why_not({}, TOOL, **{**GOOD, "glibc": "2.31"})
    assert "not Linux with glibc" == host_malloc.why_not({}, TOOL, **{**GOOD, "glibc": ""})
    assert "'never'" in host_malloc.why_not({}, TOOL, **{**GOOD, "thp": "never"})
    assert "'always'" in host_malloc.why_not({}, TOOL, **{**GOOD, "thp": "always"})
    assert "not the CPU" in host_malloc.why_not({"JAX_PLATFORMS": "cuda"}, TOOL, **GOOD)
    assert "accelerator" in host_malloc.why_not({}, TOOL, **{**GOOD, "accelerator": True})
    assert host_malloc.why_not({"JAX_PLATFORMS": "cpu"}, TOOL, **{**GOOD, "accelerator": True}) \
        is None


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
