"""Train the small Fashion-MNIST CNN used by qcompile's examples and tests.

Writes, next to this script:

* ``fashion_mnist_cnn.onnx`` -- the float model (opset 17, IR version 8).
  Input ``input`` float32 [batch, 1, 28, 28] (``batch`` is a dynamic dim),
  output ``logits`` float32 [batch, 10]. BatchNormalization nodes are kept in
  the graph on purpose (qcompile's quantizer folds them itself).
* ``fashion_mnist_test.npz`` -- the first 2000 images of the Fashion-MNIST
  TEST set: ``input`` float32 [2000, 1, 28, 28] (preprocessed) and
  ``labels`` int64 [2000].
* ``fashion_mnist_calib.npz`` -- 256 images from the TRAIN set picked with
  ``np.random.default_rng(CALIB_SEED).choice(60000, 256, replace=False)``:
  ``input`` float32 [256, 1, 28, 28] (preprocessed), calibration data.

Preprocessing (exactly what the model expects)::

    x = pixel_uint8 / 255.0
    x = (x - 0.2860) / 0.3530          # float32, layout N x 1 x 28 x 28

Data: the Debian package ``dataset-fashion-mnist`` (gzip IDX files under
/usr/share/datasets/fashion-mnist; ``dpkg -L dataset-fashion-mnist`` lists
them). Read with numpy; no torchvision.

Architecture: Conv(1->16, 3x3, pad 1) + BatchNorm + ReLU, MaxPool 2,
Conv(16->32, 3x3, pad 1) + BatchNorm + ReLU, MaxPool 2, Flatten,
Gemm(32*7*7 -> 64) + ReLU, Gemm(64 -> 10).

Retrain (torch lives in a separate venv, never in qcompile's)::

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.13.0 onnx numpy
    /work/torchenv/bin/python examples/train_fashion_mnist.py

Check the exported files with onnxruntime (no torch needed; this mode imports
only numpy, onnx and onnxruntime)::

    .venv/bin/python examples/train_fashion_mnist.py --eval-only

Everything is seeded and training runs on one thread with deterministic
algorithms, so a retrain on the same torch build reproduces the weights.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parent
MEAN = 0.2860
STD = 0.3530
SEED = 0
CALIB_SEED = 1234
N_TEST_SLICE = 2000
N_CALIB = 256
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# --------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file (the MNIST container format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) for 'train' or 't10k'."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images vs {labels.shape[0]} labels")
    return images, labels


def preprocess(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - MEAN) / STD."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :].astype(np.float32)


# ------------------------------------------------------------------------ training
def train_and_export(epochs: int, batch_size: int, lr: float) -> None:
    import torch
    import torch.nn as nn
    import onnx

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    np_rng = np.random.default_rng(SEED)

    train_u8, train_y = load_split("train")
    test_u8, test_y = load_split("t10k")
    train_x = torch.from_numpy(preprocess(train_u8))
    train_t = torch.from_numpy(train_y)
    test_x = torch.from_numpy(preprocess(test_u8))

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    n = train_x.shape[0]
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(np_rng.permutation(n))
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(train_x[idx]), train_t[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.shape[0]
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(test_x[j:j + 1000]).argmax(1) for j in range(0, 10000, 1000)])
        acc = float((pred.numpy() == test_y).mean())
        print(f"epoch {epoch + 1}: train loss {total / n:.4f}, torch test acc {acc:.4f}")

    # Export in eval mode, keeping BatchNormalization (qcompile folds it itself).
    # With torch 2.13, do_constant_folding=False alone keeps it; TrainingMode.PRESERVE
    # (the model is in eval mode, so BN is still the inference op) also skips the
    # legacy exporter's eval-mode peephole, as a guard. Checked below.
    model.eval()
    onnx_path = OUT_DIR / "fashion_mnist_cnn.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(onnx_path),
        dynamo=False,
        opset_version=17,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(onnx_path))
    m.ir_version = 8
    m.producer_name = "qcompile examples/train_fashion_mnist.py"
    onnx.checker.check_model(m)
    onnx.save(m, str(onnx_path))
    ops = [node.op_type for node in m.graph.node]
    print(f"wrote {onnx_path}: ops {ops}")
    if "BatchNormalization" not in ops:
        raise RuntimeError("BatchNormalization was folded away by the exporter")


def write_npz() -> None:
    test_u8, test_y = load_split("t10k")
    train_u8, _ = load_split("train")
    test_path = OUT_DIR / "fashion_mnist_test.npz"
    np.savez_compressed(
        test_path,
        input=preprocess(test_u8[:N_TEST_SLICE]),
        labels=test_y[:N_TEST_SLICE].astype(np.int64),
    )
    calib_idx = np.random.default_rng(CALIB_SEED).choice(train_u8.shape[0], N_CALIB, replace=False)
    calib_path = OUT_DIR / "fashion_mnist_calib.npz"
    np.savez_compressed(calib_path, input=preprocess(train_u8[calib_idx]))
    print(f"wrote {test_path} and {calib_path}")


# ---------------------------------------------------------------------- evaluation
def evaluate_onnx() -> None:
    """Accuracy of the exported ONNX with onnxruntime, full 10k test and the slice."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(OUT_DIR / "fashion_mnist_cnn.onnx"),
                                providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([
            sess.run(["logits"], {"input": x[i:i + 500]})[0].argmax(1)
            for i in range(0, x.shape[0], 500)
        ])

    sl = np.load(OUT_DIR / "fashion_mnist_test.npz")
    acc_slice = float((predict(sl["input"]) == sl["labels"]).mean())
    print(f"onnxruntime float accuracy, {sl['input'].shape[0]}-image slice: {acc_slice:.4f}")
    if (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists():
        test_u8, test_y = load_split("t10k")
        x = preprocess(test_u8)
        if not np.array_equal(x[:N_TEST_SLICE], sl["input"]):
            raise RuntimeError("committed slice differs from the preprocessed test set")
        acc_full = float((predict(x) == test_y).mean())
        print(f"onnxruntime float accuracy, full 10k test set: {acc_full:.4f}")
    else:
        print(f"{DATA_DIR} missing: install dataset-fashion-mnist for the full test set")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-only", action="store_true",
                   help="only check the existing files with onnxruntime (no torch)")
    args = p.parse_args()
    if not args.eval_only:
        train_and_export(args.epochs, args.batch_size, args.lr)
        write_npz()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime not installed here; check with: "
              ".venv/bin/python examples/train_fashion_mnist.py --eval-only")
        return
    evaluate_onnx()


if __name__ == "__main__":
    main()
