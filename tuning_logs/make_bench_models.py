"""Write the benchmark architectures (ResNet-18, MobileNetV2) as ONNX files + calibration data.

    .venv/bin/python tuning_logs/make_bench_models.py OUT_DIR [resnet18 mobilenet_v2]

The models are ``benchmarks/bench_models.py``'s (random He-scaled weights, 1x3x224x224);
the calibration ``.npz`` holds the same 8 batches ``bench_models.py`` calibrates qcompile
int8 with (its input + 0.1 x noise, seeds 0..7), so the input-quantize kernel, whose
scale is inlined, has the workload the benchmark compiles. The shipped
``tuning_logs/<model>-x86_64-avx2/`` databases were tuned from these files.
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_models  # noqa: E402


def main(argv):
    out = Path(argv[0] if argv else "build/bench_models")
    out.mkdir(parents=True, exist_ok=True)
    import onnx

    for name in argv[1:] or ["resnet18", "mobilenet_v2"]:
        model = bench_models.MODELS[name]()
        onnx.save(model, str(out / f"{name}.onnx"))
        iname, x = bench_models._input_of(model)
        calib = np.concatenate([(x + 0.1 * np.random.default_rng(i).standard_normal(x.shape))
                                .astype(np.float32) for i in range(8)])
        np.savez(out / f"{name}_calib.npz", **{iname: calib})
        print(out / f"{name}.onnx", out / f"{name}_calib.npz")


if __name__ == "__main__":
    main(sys.argv[1:])
