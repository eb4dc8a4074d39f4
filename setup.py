"""coe-jax: Collaboration of Experts in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="coe-jax",
    version="0.1.0",
    description="Collaboration of Experts (delegator + N experts with early exit) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # jax and numpy at the pinned versions (constraints.txt) need 3.11;
    # launch/python.sh gets one where a machine has only an older Python.
    python_requires=">=3.11",
    # benchmarks/ runs from the checkout (`python -m benchmarks.NAME`); it is not installed.
    packages=find_packages(include=["coe_jax", "coe_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "clu>=0.0.12",
        "tensorboard>=2.21.0",  # clu's metric writers import it.
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        # TFDS data, TensorBoard summaries, LiteRT export. No wheel on aarch64
        # (GH200/GB200 nodes): training runs without it there (docs/gpu.md).
        "tensorflow-cpu>=2.21.0; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "ott-jax>=0.6.0",
        "scikit-learn>=1.9.1",
        "matplotlib>=3.11.2",
        "Pillow>=13.0.0",
        "absl-py>=2.5.1",
        "numpy>=2.4.6",
    ],
    extras_require={
        "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "scipy>=1.17.1", "nbclient>=0.11.0",
                 "nbformat>=5.11.1", "ipykernel>=7.4.0", "ruff>=0.17.6",
                 "yapf>=0.43.0"],
        "serve": ["ai-edge-litert>=2.3.0", "numpy>=2.4.6", "Pillow>=13.0.0"],
        # NVIDIA GPUs (launch/gpu.sh). jax pins its CUDA plugin to its own
        # version, so `-c constraints.txt` fixes both.
        "cuda": ["jax[cuda12]>=0.10.2"],
        # Cloud TPU VMs (launch/tpu_pod.sh, through launch/install.sh).
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
