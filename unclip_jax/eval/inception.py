"""Inception-v3 in Flax, the FID variant (pytorch-fid's `fid_inception_v3`): pool3 2048-d features.

The FID network is the 2015 TF Inception graph, which differs from torchvision's Inception-v3:
  - FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the 3x3 average pool before `branch_pool`
    excludes padding from the count (count_include_pad=False);
  - FIDInceptionE_2 (Mixed_7c): `branch_pool` starts with a 3x3 *max* pool (stride 1, pad 1);
  - BatchNorm eps is 1e-3 (folded into the convolutions by `inception_weights`).
Parameter paths mirror the torch module names (`Mixed_5b/branch5x5_2/{kernel,bias}`), so the
state_dict `Mixed_5b.branch5x5_2.conv.weight` + `.bn.*` map to one folded conv.

Input: images [B, H, W, 3], either uint8 in [0, 255] or float in [-1, 1] (our data convention).
They are resized to 299x299 with bilinear interpolation *without* antialiasing, which is what
pytorch-fid does (F.interpolate(mode="bilinear", align_corners=False)); FID numbers are only
comparable between tools that resize the same way.

Parameters are replicated (not logically partitioned): ~22M of them, and evaluation only shards
the batch (`InceptionFeatures(mesh=...)`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
FID_SIZE = 299
FEATURE_DIM = 2048


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """conv (no bias in torch) + eval-mode BatchNorm + ReLU, with the BN folded into kernel/bias."""
    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel)
        ph, pw = _pair(self.padding)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        return nn.relu(y + bias.astype(self.dtype))


def _avg3(x):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):           # FIDInceptionA
    pool_features: int
    conv: Callable = BasicConv

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b1 = c(64, 1, name="branch1x1")(x)
        b5 = c(64, 5, padding=2, name="branch5x5_2")(c(48, 1, name="branch5x5_1")(x))
        b3 = c(64, 1, name="branch3x3dbl_1")(x)
        b3 = c(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = c(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, 1, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):           # Mixed_6a (same as torchvision)
    conv: Callable = BasicConv

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b3 = c(384, 3, stride=2, name="branch3x3")(x)
        bd = c(64, 1, name="branch3x3dbl_1")(x)
        bd = c(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = c(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], -1)


class InceptionC(nn.Module):           # FIDInceptionC
    channels_7x7: int
    conv: Callable = BasicConv

    @nn.compact
    def __call__(self, x):
        c, c7 = self.conv, self.channels_7x7
        b1 = c(192, 1, name="branch1x1")(x)
        b7 = c(c7, 1, name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, 1, name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, 1, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):           # Mixed_7a (same as torchvision)
    conv: Callable = BasicConv

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b3 = c(320, 3, stride=2, name="branch3x3_2")(c(192, 1, name="branch3x3_1")(x))
        b7 = c(192, 1, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], -1)


class InceptionE(nn.Module):           # FIDInceptionE_1 (pool="avg") / FIDInceptionE_2 ("max")
    pool: str = "avg"
    conv: Callable = BasicConv

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b1 = c(320, 1, name="branch1x1")(x)
        b3 = c(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = c(448, 1, name="branch3x3dbl_1")(x)
        bd = c(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            pooled = _avg3(x)
        else:  # the TF graph's Mixed_7c uses a max pool here (pytorch-fid keeps that quirk)
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = c(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


def to_fid_input(images, size: int = FID_SIZE):
    """uint8 [0, 255] or float [-1, 1] images [B, H, W, 3] -> float32 [-1, 1] at size x size.

    Bilinear, half-pixel centres, no antialiasing: equal to torch's F.interpolate(bilinear,
    align_corners=False) that pytorch-fid applies (resizing is linear, so resizing before or
    after the [0, 1] -> [-1, 1] map gives the same result)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception: expected images [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 127.5 - 1.0
    else:
        x = images.astype(jnp.float32)
    b, h, w, _ = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, 3), "bilinear", antialias=False)
    return x


class InceptionV3(nn.Module):
    """FID Inception-v3: images -> pool3 features [B, 2048] float32 (see module docstring).

    `resize=False` skips the resize (inputs must then already be 299x299 in [-1, 1])."""
    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images, resize: bool = True):
        x = to_fid_input(images) if resize else images.astype(jnp.float32)

        def c(*a, **kw):
            return BasicConv(*a, dtype=self.dtype, precision=self.precision, **kw)

        x = c(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = c(32, 3, name="Conv2d_2a_3x3")(x)
        x = c(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max3s2(x)
        x = c(80, 1, name="Conv2d_3b_1x1")(x)
        x = c(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max3s2(x)
        x = InceptionA(32, c, name="Mixed_5b")(x)
        x = InceptionA(64, c, name="Mixed_5c")(x)
        x = InceptionA(64, c, name="Mixed_5d")(x)
        x = InceptionB(c, name="Mixed_6a")(x)
        x = InceptionC(128, c, name="Mixed_6b")(x)
        x = InceptionC(160, c, name="Mixed_6c")(x)
        x = InceptionC(160, c, name="Mixed_6d")(x)
        x = InceptionC(192, c, name="Mixed_6e")(x)
        x = InceptionD(c, name="Mixed_7a")(x)
        x = InceptionE("avg", c, name="Mixed_7b")(x)
        x = InceptionE("max", c, name="Mixed_7c")(x)
        # pool3: global average pool (torch AdaptiveAvgPool2d((1, 1))), in float32.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def param_shapes(model: InceptionV3 | None = None) -> dict:
    """The Flax parameter tree of the model as ShapeDtypeStructs (no FLOPs, no memory)."""
    model = model or InceptionV3()
    x = jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))["params"]


class InceptionFeatures:
    """pool3 features of image batches with loaded FID weights; jitted, batch-sharded on `mesh`.

    `inception_weights.load_inception_params(path)` gives the params from pytorch-fid's .pth
    (needs torch) or the converted .npz. Call with numpy images (uint8 or [-1, 1]);
    returns float32 numpy [B, 2048]. Batches are padded up to a multiple of the mesh's batch
    size so one compiled shape serves all (padding rows are dropped from the result)."""

    def __init__(self, params, *, mesh=None, batch_axes: Sequence[str] = ("data", "fsdp"),
                 dtype: Dtype = jnp.float32, precision: Any = jax.lax.Precision.HIGHEST):
        self.model = InceptionV3(dtype=dtype, precision=precision)
        self.mesh = mesh
        self._batch_axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.shape)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            self._in_sharding = NamedSharding(mesh, P(self._batch_axes or None))
            self.params = jax.device_put(params, NamedSharding(mesh, P()))
            self._multiple = int(np.prod([mesh.shape[a] for a in self._batch_axes] or [1]))
        else:
            self.params = jax.device_put(params)
            self._multiple = 1

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"inception: expected images [B, H, W, 3], got shape {images.shape}")
        # To float32 [-1, 1] here: uint8 and float batches then share one compiled program.
        x = (images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
             if images.dtype == np.uint8 else images.astype(np.float32))
        n = x.shape[0]
        pad = (-n) % self._multiple
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)], 0)
        x = jax.device_put(x, self._in_sharding) if self.mesh is not None else x
        return np.asarray(_features(self.model, self.params, x), np.float32)[:n]


# One jit for every InceptionFeatures (the model is static, the shardings come with the
# arguments): equal models, shapes and meshes reuse one compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _features(model: InceptionV3, params, x):
    return model.apply({"params": params}, x)
