"""Shared fixtures: paths to the bundled model and data, and model files on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    return EXAMPLES / "fashion_mnist_cnn.onnx"


@pytest.fixture(scope="session")
def bundled_test_data() -> Path:
    return EXAMPLES / "fashion_mnist_test.npz"


@pytest.fixture(scope="session")
def bundled_calib_data() -> Path:
    return EXAMPLES / "fashion_mnist_calib.npz"


def save_model(model, directory: Path, name: str) -> Path:
    import onnx

    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    return path
