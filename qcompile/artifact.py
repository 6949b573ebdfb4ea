"""Load an artifact directory: the manifest is read and the library's sha256
checked *before* ``lib.so`` is handed to the dynamic loader (loading a shared
library runs its code)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from .build import BACKUP_MARK, FORMAT, LIBRARY, MANIFEST, STAGING_MARK, Artifact
from .errors import ArtifactError, DeviceError, InputError
from .frontend import check_feed, sha256_file


def read_artifact(directory: str | os.PathLike) -> Artifact:
    """Parse and validate ``manifest.json`` and check the library hash."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    name = directory.resolve().name
    if name.startswith(".") and (STAGING_MARK in name or BACKUP_MARK in name):
        raise ArtifactError(f"{directory}: a staging directory left by an interrupted "
                            "compile, not an artifact; delete it and compile again")
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a qcompile artifact "
                            "(or an interrupted compile)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({first})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a {FORMAT} manifest")
    _check_manifest(manifest, manifest_path)
    library = manifest["library"]
    lib_name = library.get("file", LIBRARY)
    if not isinstance(lib_name, str) or not lib_name or Path(lib_name).name != lib_name \
            or lib_name in (".", ".."):
        raise ArtifactError(f"{manifest_path}: library file {lib_name!r} must be a plain "
                            "file name inside the artifact")
    lib_path = directory / lib_name
    if not lib_path.is_file():
        raise ArtifactError(f"{directory}: {lib_name} is missing")
    if not lib_path.resolve().is_relative_to(directory.resolve()):
        raise ArtifactError(f"{lib_path}: is a link to a file outside the artifact; "
                            "refusing to load it")
    actual = sha256_file(lib_path)
    if actual != library.get("sha256"):
        raise ArtifactError(f"{lib_path}: sha256 {actual[:16]}… does not match the manifest's "
                            f"{str(library.get('sha256'))[:16]}…; the library was modified or "
                            "corrupted, refusing to load it")
    return Artifact(directory, manifest)


_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_manifest(manifest: dict, manifest_path: Path) -> None:
    """The manifest's structure, so that a tampered or foreign manifest ends here, in
    one ArtifactError naming the file, and not later in a KeyError or TypeError."""
    def bad(what: str):
        raise ArtifactError(f"{manifest_path}: {what}; the manifest is damaged or was not "
                            "written by qcompile")

    for key, kind in (("target", dict), ("inputs", list), ("outputs", list),
                      ("library", dict), ("model", dict)):
        if key not in manifest:
            bad(f"manifest lacks '{key}'")
        if not isinstance(manifest[key], kind):
            bad(f"'{key}' must be a {'JSON object' if kind is dict else 'list'}")
    name = manifest["target"].get("name")
    if not isinstance(name, str) or not _TARGET_NAME.match(name) or name.endswith(".toml"):
        bad(f"target name {name!r} is not a target name")
    if not isinstance(manifest["target"].get("arch", ""), str):
        bad("target arch must be a string")
    if not isinstance(manifest["model"].get("path", ""), str):
        bad("model path must be a string")
    if not manifest["inputs"]:
        bad("the model has no inputs")
    for key in ("inputs", "outputs"):
        for entry in manifest[key]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("shape"), list) \
                    or not all(type(d) is int and d >= 0 for d in entry["shape"]) \
                    or entry.get("dtype") not in _DTYPES:
                bad(f"{key} entry {str(entry)[:120]} needs a name, a shape of sizes and "
                    "a dtype")
    if not isinstance(manifest.get("quantization", {}), dict):
        bad("'quantization' must be a JSON object")
    sha = manifest["library"].get("sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        bad("library sha256 is missing or not a sha256 hex digest")


_DTYPES = {"float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "int32",
           "int64", "bool"}


class Runner:
    """A loaded artifact, runnable on a device (local, or a remote RPC device).

    On a remote device every call runs under a deadline (``remote_timeout_s``, from
    ``QCOMPILE_RPC_TIMEOUT_S``, default 600 s, stretched for long timing runs): TVM's
    RPC client waits forever on a board that hangs or drops off the network without
    closing the connection, so a call that runs past it raises DeviceError instead.
    """

    def __init__(self, artifact: Artifact, vm, device, session=None):
        self.artifact = artifact
        self.vm = vm
        self.device = device
        self.session = session
        self.remote_timeout_s = remote_timeout_s()
        self._slowest_s = 0.0

    @property
    def inputs(self):
        return self.artifact.inputs

    def _to_device(self, feed: dict[str, np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(feed[i.name]), self.device)
                for i in self.inputs]

    def _call(self, fn, what: str, timeout: float | None = None):
        """``fn()`` locally, or on the board under a deadline."""
        if self.session is None:
            return fn()
        started = time.monotonic()
        limit = timeout or max(self.remote_timeout_s, 10 * self._slowest_s)
        result = call_with_deadline(fn, limit, f"{what} ({self.artifact.directory.name})")
        self._slowest_s = max(self._slowest_s, time.monotonic() - started)
        return result

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; ``feed`` maps input names to arrays of the compiled shapes."""
        check_feed(self.inputs, feed, f"inputs for {self.artifact.directory}")
        return self._call(lambda: _outputs_to_numpy(self.vm["main"](*self._to_device(feed))),
                          "running the model")

    def time(self, feed: dict[str, np.ndarray], repeat: int = 50, min_repeat_ms: int = 20,
             warmup: int = 3) -> list[float]:
        """Latencies in ms, one per repeat (each the mean of enough runs to last
        ``min_repeat_ms``), measured with TVM's time evaluator on the device."""
        check_feed(self.inputs, feed, f"inputs for {self.artifact.directory}")
        args = self._call(lambda: self._to_device(feed), "copying inputs")
        for _ in range(warmup):
            self._call(lambda: self.vm["main"](*args), "warm-up run")
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat,
                                       min_repeat_ms=min_repeat_ms)
        expected = repeat * max(min_repeat_ms / 1000.0, self._slowest_s)
        results = self._call(lambda: timer(*args).results, "timing",
                             timeout=max(self.remote_timeout_s, 10 * self._slowest_s)
                             + 3 * expected)
        return [t * 1000.0 for t in results]


def remote_timeout_s() -> float:
    """Seconds one remote call may take before the board counts as gone."""
    text = os.environ.get("QCOMPILE_RPC_TIMEOUT_S", "")
    try:
        value = float(text) if text else 600.0
    except ValueError:
        raise InputError(f"QCOMPILE_RPC_TIMEOUT_S={text!r} is not a number of seconds"
                         ) from None
    if not value > 0:
        raise InputError(f"QCOMPILE_RPC_TIMEOUT_S={text!r} must be positive")
    return value


def call_with_deadline(fn, timeout: float, what: str):
    """Run a remote call in a daemon thread; DeviceError if it has not returned in
    ``timeout`` s. TVM's C++ call cannot be interrupted: the thread is left blocked
    (it does not keep the process from exiting) and the session must not be used
    again."""
    box: dict = {}

    def work():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=work, name="qcompile-remote-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DeviceError(f"the board did not answer within {timeout:.0f} s while "
                          f"{what}: it hung, lost power or dropped off the network "
                          "(raise QCOMPILE_RPC_TIMEOUT_S for very slow boards)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _outputs_to_numpy(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [item.numpy() for item in result]


def load(directory: str | os.PathLike, device=None, session=None) -> Runner:
    """Load an artifact after checking its hash.

    Locally (``session=None``) the artifact's target must run on this machine.
    With a TVM RPC ``session`` the library is uploaded and loaded on the board.
    """
    import tvm
    from tvm import relax

    from .target import get_target, load_spec

    artifact = read_artifact(directory)
    name = artifact.target_name
    if session is None:
        spec = _spec_for(artifact, get_target, load_spec)
        if spec is not None and not spec.runs_here():
            raise DeviceError(f"{directory} is built for {name}, which cannot run on this "
                              f"machine; run it on such a board (qcompile measure {directory} "
                              "--rpc HOST:PORT)")
        device = device or (tvm.cuda(0) if artifact.manifest["target"]["arch"] == "cuda"
                            else tvm.cpu(0))
        try:
            lib = tvm.runtime.load_module(str(artifact.library))
            vm = relax.VirtualMachine(lib, device)
        except Exception as exc:
            raise ArtifactError(f"{artifact.library}: cannot be loaded here: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
        return Runner(artifact, vm, device)
    from . import rpc

    def upload():
        remote_lib = rpc.upload_and_load(session, artifact.library)
        dev = device or session.cpu(0)
        return relax.VirtualMachine(remote_lib, dev), dev

    vm, device = call_with_deadline(upload, remote_timeout_s(),
                                    f"uploading and loading {artifact.library}")
    return Runner(artifact, vm, device, session)


def _spec_for(artifact, get_target, load_spec):
    """The TargetSpec an artifact was built for, if this machine knows it."""
    from .errors import TargetError

    try:
        return get_target(artifact.target_name)
    except TargetError:
        return None


def load_feed_npz(path: str | os.PathLike, inputs, limit: int | None = None
                  ) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Evaluation data: an .npz with one array per model input (samples on axis 0)
    and optionally ``labels``. Returns per-sample feeds (shaped like the compiled
    inputs) and the labels."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such data file") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # a zip member that is not an .npy
            raise InputError(f"{path}: member '{key}' is not a NumPy array")
        if value.ndim == 0:
            raise InputError(f"{path}: '{key}' is a scalar; expected samples on axis 0")
    labels = arrays.pop("labels", None)
    if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
        # A single unnamed array feeds a single-input model.
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    check_feed(inputs, arrays, str(path), batch_axis_free=True)
    counts = {len(arrays[i.name]) for i in inputs}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{path}: inputs hold different or zero sample counts {counts}")
    total = counts.pop()
    step = inputs[0].shape[0] if inputs[0].shape else 1
    if total < step:
        raise InputError(f"{path}: {total} samples, fewer than one batch of {step} (the "
                         "compiled batch size)")
    if labels is not None:
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                                    or labels.dtype == np.bool_):
            raise InputError(f"{path}: 'labels' must be a 1-D array of class indices, not "
                             f"{labels.dtype} of shape {labels.shape}")
        if len(labels) != total:
            raise InputError(f"{path}: {len(labels)} labels for {total} samples")
    for info in inputs:
        if np.issubdtype(arrays[info.name].dtype, np.floating) and \
                not np.isfinite(arrays[info.name]).all():
            raise InputError(f"{path}: input '{info.name}' holds NaN or Inf")
    feeds = []
    for start in range(0, total - step + 1, step):
        if limit is not None and len(feeds) * step >= limit:
            break
        feeds.append({i.name: arrays[i.name][start:start + step] for i in inputs})
    if labels is not None:
        labels = labels[:len(feeds) * step]
    return feeds, labels
