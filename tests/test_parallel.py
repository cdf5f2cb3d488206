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
