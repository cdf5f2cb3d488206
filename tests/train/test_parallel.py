"""Mesh construction from configs."""
import jax
import pytest

from unclip_jax import parallel


def test_fill_axis_and_named_axes():
    m = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


def test_multislice_layout_is_dcn_major():
    m = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 1, "dcn_data": 2})
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = [[d.id for d in row[:, 0]] for row in m.devices]
    # Slice 0 holds devices 0-3 and forms the first half of the data axis.
    assert sorted(sum(ids[:2], [])) == [0, 1, 2, 3]


def test_num_devices_subset():
    m = parallel.make_mesh({"data": -1, "num_devices": 2})
    assert m.devices.size == 2


@pytest.mark.parametrize("cfg,match", [
    ({"data": 3}, "multiply to"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 0}, "positive"),
    ({"data": -1, "dcn_data": 3}, "slices"),
])
def test_bad_mesh_is_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(cfg)


def test_rules_reject_unknown_axis():
    from ml_collections import ConfigDict
    with pytest.raises(ValueError, match="mesh.rules"):
        parallel.rules_from_config(ConfigDict({"mesh": {"rules": (("embed", "model"),)}}))


def _fresh_split(cpu_devices, xla_flags="", touch_backend_first=False):
    """split_cpu_devices in a new interpreter (JAX's CPU device count is fixed once its backend
    starts): -> (returned count, CPU devices JAX then has, stderr)."""
    import os
    import subprocess
    import sys
    code = ("import jax\nfrom unclip_jax import parallel\n"
            + ("jax.devices()\n" if touch_backend_first else "")
            + f"n = parallel.split_cpu_devices({{'cpu_devices': {cpu_devices}}})\n"
            "print(n, len(jax.devices('cpu')))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    n, have = p.stdout.split()
    return (None if n == "None" else int(n)), int(have), p.stderr


def test_cpu_devices_split_the_host():
    import os
    assert _fresh_split(3)[:2] == (3, 3)
    cores = len(os.sched_getaffinity(0))
    assert _fresh_split(-1)[:2] == (cores, cores)
    assert _fresh_split(0)[:2] == (None, 1)                      # default: JAX's one device
    # A count the user set wins; a backend already started keeps its devices, and says so.
    assert _fresh_split(3, "--xla_force_host_platform_device_count=2")[:2] == (3, 2)
    n, have, err = _fresh_split(3, touch_backend_first=True)
    assert (n, have) == (3, 1) and "mesh.cpu_devices=3: JAX already runs with 1 CPU device" in err
    with pytest.raises(ValueError, match="mesh.cpu_devices must be >= -1"):
        parallel.split_cpu_devices({"cpu_devices": -2})
