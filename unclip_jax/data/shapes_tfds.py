"""The shapes dataset as a TensorFlow-free tfds builder, built on first use.

Records are written as array_record with images as PNG bytes (tfds only needs TensorFlow to
encode numpy images or to read through tf.data); they are read back with `as_data_source`.
Every example is a pure function of (seed, split, index) (see `shapes.example`), and PNG encoding
is deterministic, so the same config gives byte-identical records. A data_dir on object storage
(gs://...) holds the dataset generated once for all processes and hosts; each process reads a
local copy (`_from_object_storage`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from unclip_jax import paths
from unclip_jax.data import shapes
from unclip_jax.data.shapes import SPLIT_IDS

MAX_OBJECTS = 2


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    num_train: int = 20_000
    num_test: int = 2_000
    seed: int = 0
    image_size: int = 64


def config_for(num_train: int, num_test: int, seed: int, image_size: int) -> ShapesConfig:
    # The name encodes every parameter, so different configs never share a directory.
    return ShapesConfig(name=f"n{num_train}_{num_test}_s{seed}_r{image_size}",
                        num_train=num_train, num_test=num_test, seed=seed,
                        image_size=image_size)


class UnclipShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned images of one or two coloured circles, squares and triangles."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "objects of half extent 0.11 / 0.2",
                     "1.1.0": "larger objects (half extent 0.16 / 0.25); builds anew"}
    BUILDER_CONFIGS = [config_for(20_000, 2_000, 0, 64)]
    # tfds finds this through importlib_resources (not installed) for packaged builders.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        label = lambda names: tfds.features.ClassLabel(names=list(names))
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "id": tfds.features.Scalar(np.int64),
                "background": label(shapes.BACKGROUND_NAMES),
                "num_objects": tfds.features.Scalar(np.int64),
                "objects": tfds.features.Sequence({
                    "shape": label(shapes.SHAPES),
                    "colour": label(shapes.COLOUR_NAMES),
                    "size": label(shapes.SIZES),
                    "position": label(shapes.POSITIONS),
                    "x": tfds.features.Scalar(np.float32),
                    "y": tfds.features.Scalar(np.float32),
                }),
            }),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for i in range(n):
            scene, text, image = shapes.example(c.seed, SPLIT_IDS[split], i, c.image_size)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "caption": text, "id": i,
                      "background": scene["background"],
                      "num_objects": len(scene["objects"]),
                      "objects": [{k: o[k] for k in ("shape", "colour", "size", "position",
                                                      "x", "y")} for o in scene["objects"]]}


def default_data_dir() -> str:
    return os.environ.get("UNCLIP_DATA_DIR") or os.path.expanduser("~/.cache/unclip_jax/tfds")


def builder(num_train: int = 20_000, num_test: int = 2_000, seed: int = 0,
            image_size: int = 64, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The shapes builder for these parameters, prepared (generated once, then reused)."""
    data_dir = data_dir or default_data_dir()
    config = config_for(num_train, num_test, seed, image_size)
    if paths.is_url(data_dir):
        return _from_object_storage(data_dir, config)
    os.makedirs(data_dir, exist_ok=True)
    if config.name in UnclipShapes.builder_configs:  # tfds wants registered configs by name
        config = config.name
    b = UnclipShapes(data_dir=data_dir, config=config, file_format="array_record")
    # Processes on one host may race to build: a file lock makes the others wait and reuse.
    with open(os.path.join(data_dir, ".unclip_shapes.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            b.download_and_prepare(
                download_config=tfds.download.DownloadConfig(verify_ssl=False))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return b


def _from_object_storage(data_dir: str, config: ShapesConfig) -> tfds.core.DatasetBuilder:
    """The dataset under an object-store data_dir (gs://...), in tfds' layout there
    (<data_dir>/unclip_shapes/<config>/<version>/). tfds writes and reads array_record files
    with local file I/O only (no TensorFlow), so process 0 generates it in a local temporary
    folder and uploads it once (`distributed.write_once`: its DONE_FILE last, so a half
    upload is never read), and each process reads a local copy (`paths.local_dir`, downloaded
    once per process)."""
    from unclip_jax import distributed
    url = (f"{data_dir.rstrip('/')}/{UnclipShapes.name}/{config.name}/"
           f"{UnclipShapes.VERSION}")

    def generate(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix="unclip_shapes_") as local:
            b = builder(config.num_train, config.num_test, config.seed, config.image_size,
                        data_dir=local)
            shutil.move(os.fspath(b.data_dir), tmp)
    distributed.write_once(url, generate)
    return tfds.builder_from_directory(paths.local_dir(url))


def scene_of(record: dict) -> dict:
    """Rebuild the scene dict of a decoded record (names instead of class ids)."""
    objs = record["objects"]
    n = int(record["num_objects"])
    return {"background": shapes.BACKGROUND_NAMES[int(record["background"])],
            "objects": [{"shape": shapes.SHAPES[int(objs["shape"][k])],
                         "colour": shapes.COLOUR_NAMES[int(objs["colour"][k])],
                         "size": shapes.SIZES[int(objs["size"][k])],
                         "position": shapes.POSITIONS[int(objs["position"][k])],
                         "x": float(objs["x"][k]), "y": float(objs["y"][k])}
                        for k in range(n)]}
