"""Load the FID Inception weights from a local file: pytorch-fid's .pth state_dict or an .npz.

The weights are those every FID tool uses: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(the 2015 TF Inception graph ported to torch), from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
  pt_inception-2015-12-05-6726825d.pth
Nothing is downloaded here: fetch that file where there is network access and copy it over.

Convert once so evaluation runs without torch (torch is only a test dependency):
  python -m unclip_jax.eval.inception_weights --src=pt_inception-2015-12-05-6726825d.pth
      --out=pt_inception-2015-12-05.npz
The .npz holds the same tensor names as the state_dict (`Mixed_5b.branch1x1.conv.weight`, ...).

Mapping: each torch BasicConv2d `P.conv.weight` [O, I, kh, kw] + `P.bn.{weight, bias,
running_mean, running_var}` becomes the Flax conv `P` (path with "/" for ".") with BatchNorm
folded in (eval mode, eps 1e-3, folded in float64):
  kernel = weight^T(HWIO) * gamma / sqrt(var + eps),  bias = beta - mean * gamma / sqrt(var + eps).
Tensors the FID features do not use (`fc.*`, `AuxLogits.*`, `*.num_batches_tracked`) are ignored.
"""
from __future__ import annotations

import os

import numpy as np

BN_EPS = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _missing_file_message(path: str) -> str:
    return (f"FID Inception weights not found at {path!r}. Use pytorch-fid's {WEIGHTS_FILE} "
            f"(from {WEIGHTS_URL}; nothing is downloaded automatically): fetch it where there is "
            f"network access, copy it here, and point the config's inception_weights at it "
            f"(optionally convert it to .npz with `python -m unclip_jax.eval.inception_weights "
            f"--src={WEIGHTS_FILE} --out=inception.npz` so torch is not needed).")


def read_state(path: str) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array from a .pth state_dict (needs torch) or an .npz."""
    from unclip_jax import paths
    if paths.is_url(path):   # gs://...: read from a local copy
        if not paths.path(path).is_file():
            raise FileNotFoundError(_missing_file_message(path))
        path = paths.local_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path))
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path!r} (a torch state_dict) needs torch, which is only in the test "
            f"extra: pip install torch, or convert it elsewhere with `python -m "
            f"unclip_jax.eval.inception_weights --src={path} --out=X.npz` and load the .npz"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state_dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):  # wrapped checkpoints
        state = state["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _conv_paths(tree, prefix=()):
    """Paths of the Flax convs (dicts holding a "kernel") in a parameter tree."""
    if "kernel" in tree:
        yield prefix, tree
        return
    for k, v in tree.items():
        yield from _conv_paths(v, prefix + (k,))


def convert_state(state: dict[str, np.ndarray], shapes=None, eps: float = BN_EPS) -> dict:
    """A torch-named state (pytorch-fid layout) -> Flax params of `inception.InceptionV3`.

    Raises KeyError / ValueError naming the torch tensor that is missing or has the wrong
    shape. `shapes` is the model's abstract param tree (default: `inception.param_shapes()`)."""
    if shapes is None:
        from unclip_jax.eval.inception import param_shapes
        shapes = param_shapes()
    shapes = _plain(shapes)
    params: dict = {}
    for path, leaf in _conv_paths(shapes):
        kh, kw, cin, cout = leaf["kernel"].shape
        name = ".".join(path)
        want = {f"{name}.conv.weight": (cout, cin, kh, kw),
                **{f"{name}.bn.{f}": (cout,) for f in _BN_FIELDS}}
        for key, shape in want.items():
            if key not in state:
                raise KeyError(f"inception weights: tensor {key!r} is missing (expected shape "
                               f"{shape}); is this pytorch-fid's {WEIGHTS_FILE}?")
            if tuple(np.shape(state[key])) != shape:
                raise ValueError(f"inception weights: tensor {key!r} has shape "
                                 f"{tuple(np.shape(state[key]))}, expected {shape}")
        w = np.asarray(state[f"{name}.conv.weight"], np.float64)
        gamma, beta, mean, var = (np.asarray(state[f"{name}.bn.{f}"], np.float64)
                                  for f in _BN_FIELDS)
        scale = gamma / np.sqrt(var + eps)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node["kernel"] = (w.transpose(2, 3, 1, 0) * scale).astype(np.float32)
        node["bias"] = (beta - mean * scale).astype(np.float32)
    return params


def _plain(tree):
    """Unbox flax.core FrozenDicts / metadata boxes into nested dicts."""
    try:
        import flax.linen as nn
        tree = nn.meta.unbox(tree)
    except ImportError:
        pass
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def load_inception_params(path: str) -> dict:
    """Flax params of the FID Inception from pytorch-fid's .pth or its .npz conversion."""
    return convert_state(read_state(path))


def convert_file(src: str, out: str) -> int:
    """Write every floating tensor of `src` (.pth) to `out` (.npz) under the same names, after
    checking that the set is a complete FID Inception. Returns the number of tensors written."""
    if not out.endswith(".npz"):
        raise ValueError(f"the output {out!r} must end in .npz")
    state = read_state(src)
    convert_state(state)  # fail here, not at evaluation time, on a wrong or partial file
    arrays = {k: np.asarray(v, np.float32) for k, v in state.items()
              if np.issubdtype(np.asarray(v).dtype, np.floating)}
    from unclip_jax import paths
    paths.save_npz(out, **arrays)   # a local path or a gs:// URL
    return len(arrays)


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    n = convert_file(f.src, f.out)
    print(f"wrote {n} tensors to {f.out}")


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("src", None, f"pytorch-fid's {WEIGHTS_FILE} (a torch state_dict).")
    flags.DEFINE_string("out", None, "The .npz to write (same tensor names).")
    flags.mark_flags_as_required(["src", "out"])
    flags.register_validator("out", lambda v: v is None or v.endswith(".npz"),
                             "--out must end in .npz")
    from unclip_jax import console
    console.run_app(main)
