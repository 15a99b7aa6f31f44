"""tm-tensorboard: layer-by-layer invariance and equivariance of neural networks, live in TensorBoard."""
from setuptools import setup

setup(
    name="tm-tensorboard",
    version="0.1.0",
    description="Measure how invariant / equivariant every layer and unit of a PyTorch network is to input "
    "transformations while it trains, and see it in TensorBoard's Invariance tab.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # examples/ ships as tm_tensorboard.examples so that the `demo` command finds its models.
    # frontend/ ships as tm_tensorboard.frontend (static files the plugin serves).
    packages=[
        "tm_tensorboard",
        "tm_tensorboard.proto",
        "tm_tensorboard.plugin",
        "tm_tensorboard.frontend",
        "tm_tensorboard.examples",
    ],
    package_dir={
        "tm_tensorboard": "tm_tensorboard",
        "tm_tensorboard.frontend": "frontend",
        "tm_tensorboard.examples": "examples",
    },
    package_data={"tm_tensorboard.proto": ["*.proto"], "tm_tensorboard.frontend": ["*.js", "*.css", "*.svg"]},
    entry_points={
        "tensorboard_plugins": ["tm_invariance = tm_tensorboard.plugin.loader:InvarianceLoader"],
        "console_scripts": ["tm-tensorboard = tm_tensorboard.cli:main"],
    },
    install_requires=[
        "torch>=2.1,<3",
        "tensorboard>=2.21,<3",
        "protobuf>=6.31.1,<8",
        "numpy>=1.24",
        "werkzeug>=1.0.1",
        # CRC32C in C for the event files (TensorBoard's writer checksums in pure Python, ~0.2 s per MiB);
        # 1.5 added Python 3.11 wheels.
        "google-crc32c>=1.5",
    ],
    extras_require={
        # pytest runs the suite; playwright drives Debian's Chromium in the browser tests (never
        # `playwright install`); grpcio-tools checks the committed *_pb2.py against the .proto; tbparse
        # and scipy are independent readers / references the tests compare against; lightning and pandas
        # are there so the tests exercise the callback and read(...).to_pandas() for real; scikit-learn
        # ships real handwritten digits (no download) for the tests that need real images.
        "test": [
            "pytest>=7", "playwright>=1.40", "grpcio-tools>=1.62", "tbparse>=0.0.8", "scipy>=1.10",
            "lightning>=2.2", "pandas>=2", "scikit-learn>=1.3",
        ],
        # tm_tensorboard.lightning.InvarianceCallback, for PyTorch Lightning's Trainer.
        "lightning": ["lightning>=2.2"],
        # read(logdir).to_pandas(): the measures as a data frame.
        "pandas": ["pandas>=2"],
        # The reference implementation the benchmarks compare speed and numbers against.
        "bench": ["tmeasures==1.2.11", "statsmodels"],
    },
)
