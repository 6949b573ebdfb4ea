"""Calibration: run the float model and observe the tensors that get quantized.

``load_calibration`` turns the user's data into an iterable of
``{input_name: array[N, ...]}`` batches; ``calibrate`` compiles the prepared
float module once, with the observed tensors added as extra outputs, runs it
over every batch (at the model's own static batch size) and feeds each
observed tensor to its observer.

Accepted calibration data:

* ``.npz`` -- one array per model input, keyed by the input name (a file with
  exactly one array also fits a one-input model), batch on axis 0;
* ``.npy`` -- one array, for a one-input model;
* a directory of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.pgm``,
  ``.ppm``), for a one-input model of shape ``[N, C, H, W]``: each image is read
  with Pillow, converted to grayscale (C = 1) or RGB (C = 3), resized to H x W
  (bilinear), scaled to [0, 1], then normalized with ``mean`` / ``std`` (default
  0 and 1, i.e. no normalization), laid out as CHW float32. Files are taken in
  sorted name order;
* from Python, any iterable of ``{input_name: array}`` dicts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm")


class CalibrationData:
    """Re-iterable calibration batches with the name of where they came from."""

    def __init__(self, batches, source: str):
        self._batches = batches
        self.source = source

    def __iter__(self):
        return iter(self._batches)

    def __len__(self):
        return len(self._batches)


def load_calibration(path, inputs, mean=None, std=None, batch_size: int = 64,
                     limit: int | None = None) -> CalibrationData:
    """Calibration batches from ``path`` (.npz, .npy or an image directory; see module doc).

    ``inputs`` is the model's list of ``TensorInfo``. Shapes and dtypes are
    checked here and again per batch in :func:`calibrate`; errors are
    :class:`~qcompile.errors.InputError` naming the input and the file.
    ``limit`` keeps at most that many samples.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise InputError(f"{source}: calibration data not found")
    if path.is_dir():
        arrays = {_single_input(inputs, source).name: _load_images(path, inputs, mean, std)}
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise InputError(f"{source}: cannot read as .npz ({exc})") from None
        names = [i.name for i in inputs]
        if len(inputs) == 1 and names[0] not in arrays:
            candidates = [k for k in arrays if k not in ("labels", "label", "y")]
            if len(candidates) != 1:
                raise InputError(f"{source}: no array named '{names[0]}' (the model input); "
                                 f"the file has {sorted(arrays)}")
            arrays = {names[0]: arrays[candidates[0]]}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputError(f"{source}: no array for model input(s) {missing}; "
                             f"the file has {sorted(arrays)}")
        arrays = {n: arrays[n] for n in names}
    elif path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{source}: cannot read as .npy ({exc})") from None
        arrays = {_single_input(inputs, source).name: array}
    else:
        raise InputError(f"{source}: calibration data must be a .npz or .npy file or a "
                         "directory of images")
    for info in inputs:
        check_array(info, arrays[info.name], source)
    count = len(next(iter(arrays.values())))
    if any(len(a) != count for a in arrays.values()):
        raise InputError(f"{source}: the input arrays have different sample counts "
                         f"{ {k: len(a) for k, a in arrays.items()} }")
    if limit is not None:
        count = min(count, limit)
    batches = [{k: a[start:start + batch_size] for k, a in arrays.items()}
               for start in range(0, count, batch_size)]
    return CalibrationData(batches, source)


def _single_input(inputs, source):
    if len(inputs) != 1:
        raise InputError(f"{source}: this form of calibration data feeds one input, but the "
                         f"model has {len(inputs)}: {[i.name for i in inputs]}; use an .npz "
                         "keyed by input name")
    return inputs[0]


def _load_images(path: Path, inputs, mean, std) -> np.ndarray:
    info = _single_input(inputs, str(path))
    if len(info.shape) != 4 or info.shape[1] not in (1, 3):
        raise InputError(f"{path}: a directory of images feeds an input of shape [N, 1|3, H, W]; "
                         f"input '{info.name}' has shape {info.shape}")
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"{path}: reading images needs Pillow (pip install pillow); or pass "
                         "an .npz of preprocessed arrays") from None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the directory")
    channels, height, width = info.shape[1:]
    mean = np.asarray(0.0 if mean is None else mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(1.0 if std is None else std, dtype=np.float32).reshape(-1, 1, 1)
    out = []
    for file in files:
        try:
            image = Image.open(file).convert("L" if channels == 1 else "RGB")
        except Exception as exc:
            raise InputError(f"{file}: cannot read image ({exc})") from None
        image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        out.append((array - mean) / std)
    return np.stack(out).astype(np.float32)


def check_array(info, array, source: str) -> None:
    """Shape (batch axis free), dtype, emptiness and NaN/Inf checks for one input."""
    array = np.asarray(array)
    if array.ndim != len(info.shape) or tuple(array.shape[1:]) != tuple(info.shape[1:]):
        want = ("N",) + tuple(info.shape[1:])
        raise InputError(f"{source}: calibration data for input '{info.name}' has shape "
                         f"{tuple(array.shape)}, the model expects "
                         f"[{', '.join(str(d) for d in want)}]")
    if str(array.dtype) != info.dtype:
        raise InputError(f"{source}: calibration data for input '{info.name}' has dtype "
                         f"{array.dtype}, the model expects {info.dtype}")
    if array.shape[0] == 0:
        raise InputError(f"{source}: calibration data for input '{info.name}' is empty "
                         "(0 samples)")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{source}: calibration data for input '{info.name}' contains NaN "
                         "or Inf")


def observe_module(mod, extra):
    """``mod`` whose main also returns the float tensors ``extra`` (original vars)."""
    from tvm import relax

    from . import _ir

    def finish(bb, ret, remap):
        fields = [_ir.substitute(ret, remap)] + [remap[v] for v in extra]
        return relax.Tuple(fields)

    return _ir.rewrite_main(mod, _ir.copy_binding, finish)


def _use_progress(progress) -> bool:
    if progress is None:
        return sys.stderr.isatty() and not os.environ.get("QCOMPILE_NO_PROGRESS")
    return bool(progress)


def iterate_batches(calib, inputs, progress=None, desc="calibrating"):
    """Yield ``(feed at the model's static batch size, valid rows)`` for every batch.

    Batches are re-chunked to the model's batch size B (axis 0 of its inputs);
    a short last chunk is padded by repeating its last sample, and ``valid``
    says how many leading rows are real.
    """
    from tqdm import tqdm

    source = getattr(calib, "source", "calibration data")
    if calib is None:
        raise InputError("no calibration data: pass --calib DATA (an .npz keyed by input name, "
                         "an .npy, or a directory of images)")
    batch = inputs[0].shape[0]
    total = len(calib) if hasattr(calib, "__len__") else None
    seen = 0
    for feed in tqdm(calib, total=total, desc=desc, unit="batch", file=sys.stderr,
                     disable=not _use_progress(progress), leave=False):
        if not isinstance(feed, dict):
            raise InputError(f"{source}: each calibration batch must be a dict "
                             f"{{input_name: array}}, got {type(feed).__name__}")
        for info in inputs:
            if info.name not in feed:
                raise InputError(f"{source}: a calibration batch has no array for model input "
                                 f"'{info.name}' (has {sorted(feed)})")
            check_array(info, feed[info.name], source)
        count = len(feed[inputs[0].name])
        for start in range(0, count, batch):
            chunk = {}
            for info in inputs:
                part = np.asarray(feed[info.name])[start:start + batch]
                valid = len(part)
                if valid < batch:
                    part = np.concatenate([part, np.repeat(part[-1:], batch - valid, axis=0)])
                chunk[info.name] = np.ascontiguousarray(part)
            seen += 1
            yield chunk, valid
    if seen == 0:
        raise InputError(f"{source}: calibration data is empty (no batches)")


def run_with_outputs(mod, extra, spec, calib, inputs, on_batch, progress=None,
                     desc="calibrating"):
    """Compile ``mod`` returning ``extra`` too; call ``on_batch(outputs, valid)`` per batch.

    ``outputs`` is ``[model output(s), *extra]`` as numpy arrays, rows beyond
    ``valid`` dropped where a tensor's axis 0 is the batch axis.
    """
    run_module(observe_module(mod, extra), spec, calib, inputs, on_batch, progress, desc)


def runnable_spec(spec):
    """``spec`` if its code runs on this machine, else the host's own target.

    Calibration, SQNR and the fallback search run the model here, whatever the
    final target is (an aarch64 or CUDA module cannot run on this machine).
    """
    from ..target import get_target

    return spec if spec.runs_here() else get_target("host")


def run_module(mod, spec, calib, inputs, on_batch, progress=None, desc="running", exe=None):
    """Compile ``mod`` (main returns a tuple) and call ``on_batch(fields, valid)`` per batch.

    ``exe``: an already compiled (runnable here) executable of ``mod``; ``mod`` is
    then unused.
    """
    import tvm
    from tvm import relax

    from ..pipeline import compile_relax

    if exe is None:
        exe = compile_relax(mod, runnable_spec(spec))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    batch = inputs[0].shape[0]
    for feed, valid in iterate_batches(calib, inputs, progress, desc):
        args = [tvm.runtime.tensor(feed[i.name]) for i in inputs]
        result = vm["main"](*args)
        arrays = [_to_numpy(r) for r in result]
        if valid < batch:
            arrays = [a[:valid] if (isinstance(a, np.ndarray) and a.ndim and a.shape[0] == batch)
                      else a for a in arrays]
        if on_batch.__code__.co_argcount >= 3:
            on_batch(arrays, valid, feed)
        else:
            on_batch(arrays, valid)


def _to_numpy(value):
    if hasattr(value, "numpy"):
        return value.numpy()
    return [_to_numpy(v) for v in value]


def calibrate(mod, plan, spec, calib, inputs, observer_factory, progress=None, extra=(),
              keep_samples: int = 0, channel_means=None):
    """Observe every root of ``plan`` over ``calib``; returns ``(observers, kept)``.

    ``observers`` maps each root var to its observer. The same run also
    returns the float values of ``extra`` (vars) for the first
    ``keep_samples`` samples: ``kept`` is a list of ``(feed, valid, arrays)``
    with ``arrays = [model output, *extra]`` -- the float reference for
    per-layer SQNR, without a second float run. ``channel_means`` ({var:
    channel axis}) asks for per-channel means of those vars over all batches;
    they are returned as ``observers["means"]`` ({var: [C] array}).
    """
    observers = {var: observer_factory() for var in plan.roots}
    roots = list(plan.roots)
    mean_vars = list(channel_means or {})
    sums = {var: None for var in mean_vars}
    counts = {var: 0 for var in mean_vars}
    kept = []
    state = {"samples": 0}
    first_mean = 1 + len(roots) + len(extra)

    source = getattr(calib, "source", "calibration data")

    def on_batch(arrays, valid, feed):
        for var, array in zip(roots, arrays[1:1 + len(roots)]):
            if not np.all(np.isfinite(array)):
                largest = max(float(np.max(np.abs(feed[i.name]))) for i in inputs)
                raise InputError(
                    f"{source}: the float model computes Inf or NaN at tensor '{var.name}' "
                    f"on this calibration data (largest input magnitude {largest:.3g}); "
                    "check the preprocessing (scale, normalization) of the data")
            observers[var].update(array)
        for var, array in zip(mean_vars, arrays[first_mean:]):
            axis = channel_means[var] % array.ndim
            moved = np.moveaxis(np.asarray(array, np.float64), axis, -1)
            flat = moved.reshape(-1, moved.shape[-1])
            sums[var] = flat.sum(axis=0) + (0 if sums[var] is None else sums[var])
            counts[var] += flat.shape[0]
        if state["samples"] < keep_samples:
            kept.append((feed, valid, [arrays[0], *arrays[1 + len(roots):first_mean]]))
            state["samples"] += valid

    run_module(observe_module(mod, roots + list(extra) + mean_vars), spec, calib, inputs,
               on_batch, progress, "calibrating")
    if mean_vars:
        observers["means"] = {v: sums[v] / max(counts[v], 1) for v in mean_vars}
    return observers, kept
