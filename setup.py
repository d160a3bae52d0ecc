"""moe_jax: sparse Mixture-of-Experts transformers in JAX/Flax."""

import setuptools

# One stack that resolves together (see ../shared/STACK_NOTES.md). TensorFlow is only for the
# data pipeline (seqio -> tensorflow-text); moe_jax.layers / moe_jax.models never import it.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy==2.4.6",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets imports it while building a dataset but does not declare it on 3.11.
    "importlib_resources==7.1.0",
    "tensorboard==2.21.0",  # event files written through tf.summary
    "sacrebleu==2.6.0",  # BLEU for translation (seqio 0.0.20 ships no text metrics)
    "safetensors==0.8.0",  # moe_jax.convert reads Hugging Face checkpoints (numpy, no torch)
    "scikit-learn==1.9.1",  # the offline `digits` image task (load_digits ships in the wheel)
    "matplotlib==3.11.2",  # routing_report and study plots (PNG)
    "scipy-openblas64==0.3.34.481.3",  # the CPU grouped matmul (moe_jax/layers/openblas_matmul.cc)
]

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts transformers in JAX/Flax",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    package_data={"moe_jax.layers": ["*.cc"]},  # compiled on first use (openblas_matmul.py)
    # The same functions as scripts/*.py (gin files are found under the repo's configs/ in an
    # editable install, as `make install` does, or with --gin_search_paths).
    entry_points={"console_scripts": [
        "moe-jax-train=moe_jax.cli:train",
        "moe-jax-eval=moe_jax.cli:evaluate",
        "moe-jax-infer=moe_jax.cli:infer",
        "moe-jax-model-info=moe_jax.cli:model_info",
    ]},
    # transformers + torch (CPU wheel) are the reference the converter is tested against;
    # pytest-xdist runs the suite's files in parallel workers (`make test`).
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "transformers==5.24.0",
                             "torch==2.13.0"]},
)
