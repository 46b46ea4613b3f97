"""alit-jax: JAX/Flax implementation of ALIT (Adaptive Length Image Tokenizer)."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.10",
  "flax>=0.12",
  "optax",
  "orbax-checkpoint",
  "einops",
  "ml-collections",
  "numpy",
  "ml_dtypes",
  "pillow",
  "tqdm",
  "absl-py",
]

EXTRAS = {
  # Training and dataset tools (grain + TFDS array_record, clu writers over tensorboardX).
  "train": [
    "tensorflow-datasets",
    "grain",
    "array-record",
    "msgpack",
    "clu",
    "tensorboardX",
    "scipy",
  ],
  # Evaluation and experiments (alit_jax.evaluate, experiments/): grain/TFDS sources, plots,
  # Spearman / Mann-Whitney / sqrtm; scikit-image only for experiments/make_sample_data.py.
  "eval": [
    "tensorflow-datasets",
    "grain",
    "scipy",
    "matplotlib",
    "scikit-image",
  ],
  # Training the bundled demo model (configs/demo_*.py): the photos these packages ship.
  "demo": [
    "scikit-image",
    "scikit-learn",
    "matplotlib",
  ],
  # torch is only used by tests that compare against plain-torch networks; the 2.13.0 CPU
  # wheel is taken from local disk on the project machines (a plain `torch` pulls CUDA).
  "test": [
    "pytest",
    "pytest-timeout",
    "pytest-xdist",
    "safetensors",  # the real reader beside our hand-written one (tests/test_pth_reader.py)
    "torch==2.13.0",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "nbclient",
    "ipykernel",
    "nbformat",
  ],
}
EXTRAS["demo"] = sorted(set(EXTRAS["demo"] + EXTRAS["train"]))
EXTRAS["test"] = sorted(set(EXTRAS["test"] + EXTRAS["train"]))
EXTRAS["all"] = sorted(set(sum(EXTRAS.values(), [])))

setuptools.setup(
  name="alit-jax",
  version="0.1.0",
  description="JAX/Flax Adaptive Length Image Tokenizer (ALIT), faithful to the PyTorch reference.",
  packages=setuptools.find_packages(include=["alit_jax", "alit_jax.*"]),
  package_data={"alit_jax": ["assets/**/*", "assets/*"]},
  include_package_data=True,
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
)
