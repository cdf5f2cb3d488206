"""Device mesh and logical-axis sharding shared by every model and the trainer.

Models annotate parameters with the logical axis names below (flax logical partitioning:
`nn.with_logical_partitioning(init, ("embed", "mlp"))`) and activations with
`nn.with_logical_constraint(x, ("batch", ...))`. A config's `mesh.rules` maps logical names to
mesh axes, so one model shards over data / fsdp / tensor without code changes.

Logical names (use these, not new ones, unless a model truly needs another):
  batch     activations' batch dimension                 -> (data, fsdp)
  embed     model width of dense kernels (input side)    -> fsdp
  mlp       MLP hidden width                             -> tensor
  heads     attention q/k/v output (= heads * head_dim)  -> tensor
  vocab     embedding tables' vocabulary                 -> tensor
  conv_in   conv kernels' input channels                 -> fsdp
  conv_out  conv kernels' output channels                -> tensor
  norm      norm scales/biases and other small vectors   -> replicated
  layers    the stacked axis of scanned transformer blocks -> replicated
  length, height, width, act_embed, act_heads            -> replicated (activations)
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("layers", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
)


def _fill_sizes(sizes: Sequence[int], total: int, what: str) -> list[int]:
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of {what} may be -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: {what} sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if total % known:
            raise ValueError(f"mesh: {total} devices are not divisible by {what} {sizes}")
        sizes[sizes.index(-1)] = total // known
    if int(np.prod(sizes)) != total:
        raise ValueError(f"mesh: {what} {sizes} multiply to {int(np.prod(sizes))}, "
                         f"but there are {total} devices")
    return sizes


def split_cpu_devices(mesh_config) -> int | None:
    """Honour `mesh.cpu_devices`: split this host's CPU into that many XLA devices (-1: one per
    core) so the step runs data-parallel over the cores. 0 (the default) leaves JAX alone.

    Must run before JAX starts its backends; a device count the user set (XLA_FLAGS'
    --xla_force_host_platform_device_count, jax_num_cpu_devices) wins. If the backends are
    already up (tests with fake devices, a later stage of the same process), the devices that
    exist are used, with a warning if their number differs. Returns the count asked for, or None.
    No effect on GPU/TPU devices.
    """
    n = int(mesh_config.get("cpu_devices", 0) or 0)
    if n == 0:
        return None
    if n < -1:
        raise ValueError(f"mesh.cpu_devices must be >= -1 (-1: one per core), got {n}")
    want = len(os.sched_getaffinity(0)) if n == -1 else n
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1):
        return want
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != want:
            logging.warning("mesh.cpu_devices=%d: JAX already runs with %d CPU device(s); "
                            "using those", n, have)
    return want


def mesh_shape(mesh_config, num_devices: int) -> tuple[list[int], list[int]]:
    """(ICI sizes, DCN sizes) for axes data/fsdp/tensor; -1 fills the remaining devices."""
    dcn = [int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES]
    num_slices = int(np.prod([d for d in dcn if d != -1]))
    if -1 in dcn:
        raise ValueError("mesh: dcn_* sizes must be explicit (no -1)")
    if num_devices % num_slices:
        raise ValueError(f"mesh: {num_devices} devices cannot form {num_slices} slices")
    ici = _fill_sizes([int(mesh_config.get(a, 1)) for a in MESH_AXES],
                      num_devices // num_slices, "mesh.data/fsdp/tensor")
    return ici, dcn


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the data/fsdp/tensor mesh described by `mesh_config` (a ConfigDict or dict)."""
    if devices is None:
        devices = jax.devices()
        n = int(mesh_config.get("num_devices", 0) or 0)
        if n:  # use the first n devices (single-device reference runs, scaling benchmarks)
            if n > len(devices):
                raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices exist")
            devices = devices[:n]
    devices = list(devices)
    ici, dcn = mesh_shape(mesh_config, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if int(np.prod(dcn)) > 1:
        from jax.experimental import mesh_utils
        if hasattr(devices[0], "slice_index"):
            arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        else:
            # No slice topology (CPU, single GPU host): consecutive device blocks play slices,
            # laid out as create_hybrid_device_mesh does (each axis = dcn-major, ici-minor).
            arr = np.asarray(devices).reshape(*dcn, *ici)
            arr = arr.transpose(0, 3, 1, 4, 2, 5).reshape([d * i for d, i in zip(dcn, ici)])
        return Mesh(arr, MESH_AXES, axis_types=axis_types)
    shape = tuple(ici)
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)


def rules_from_config(config) -> tuple[tuple[str, object], ...]:
    """Logical axis rules from `config.mesh.rules` (tuple of (name, axis|tuple|None)), or defaults."""
    rules = config.get("mesh", {}).get("rules", None) if hasattr(config, "get") else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for item in rules:
        name, axes = item
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"mesh.rules: logical axis {name!r} maps to unknown mesh axis "
                                 f"{a!r}; mesh axes are {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch's leading dimension over the data-parallel axes (data and fsdp)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def shard_rows(mesh: Mesh | None, *arrays) -> tuple:
    """Each array with its leading (batch) dimension padded to a multiple of the mesh's devices
    (repeating the last row: the caller keeps its first rows) and sharded by batch_sharding;
    without a mesh, the arrays as they are."""
    if mesh is None:
        return tuple(jax.numpy.asarray(a) for a in arrays)
    k = mesh.devices.size
    out = []
    for a in arrays:
        a = np.asarray(a)
        m = -(-len(a) // k) * k
        if m > len(a):
            a = np.concatenate([a, np.repeat(a[-1:], m - len(a), 0)], 0)
        out.append(jax.device_put(a, batch_sharding(mesh)))
    return tuple(out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
