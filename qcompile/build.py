"""``compile``: Relax module + target -> an artifact directory.

An artifact is a directory holding ``lib.so`` (the VM executable exported with
the target's compiler; cross-linked for boards) and ``manifest.json`` (inputs,
outputs, target, versions, sha256 of the library and of the source model, the
quantization summary). It is written to a temporary sibling directory and
renamed into place at the end, so an interrupted compile never leaves a
half-written artifact that later loads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import BuildError, InputError, QCompileError
from .frontend import ImportedModel, TensorInfo, sha256_file
from .target import TargetSpec, get_target

MANIFEST = "manifest.json"
LIBRARY = "lib.so"
FORMAT = "qcompile-artifact/1"
# Staging directories of a compile in progress (".NAME.partial-XXXX") and the backup of
# a replaced artifact (".NAME.old-PID"): never loadable, whatever they hold.
STAGING_MARK = ".partial-"
BACKUP_MARK = ".old-"


@dataclass
class Artifact:
    """A compiled model on disk: its directory and parsed manifest."""

    directory: Path
    manifest: dict = field(default_factory=dict)

    @property
    def library(self) -> Path:
        return self.directory / self.manifest.get("library", {}).get("file", LIBRARY)

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"])
                for i in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(o["name"], tuple(o["shape"]), o["dtype"])
                for o in self.manifest["outputs"]]

    @property
    def quantized(self) -> bool:
        return self.manifest.get("quantization", {}).get("mode", "none") != "none"


def compile_model(model: str | os.PathLike | ImportedModel, target: str | TargetSpec | None,
                  output_dir: str | os.PathLike, *, quantize: str = "none", calib=None,
                  quant_config=None, tuning_log: str | os.PathLike | None = None,
                  input_shapes: dict | None = None, log=None) -> Artifact:
    """Import (if given a path), optionally quantize, build and export an artifact."""
    from .frontend import import_onnx

    say = log or (lambda msg: None)
    spec = get_target(target)
    started = time.perf_counter()
    imported = model if isinstance(model, ImportedModel) else import_onnx(model, input_shapes)
    for notice in imported.notices:
        say(f"note: {notice}")
    mod, quant_summary = imported.mod, {"mode": "none"}
    if quantize == "int8":
        mod, quant_summary = _quantize(imported, calib, quant_config, spec, say)
    elif quantize != "none":
        raise QCompileError(f"--quantize must be 'int8' or 'none', not '{quantize}'")
    database, tuning = _tuning_database(mod, spec, tuning_log, say)
    say(f"building {imported.name} for {spec.name} ...")
    executable = _build(mod, spec, database)
    build_seconds = time.perf_counter() - started
    return write_artifact(executable, imported, spec, output_dir, quant_summary, tuning,
                          build_seconds, say)


def _quantize(imported, calib, quant_config, spec, say):
    try:
        from .quantize import QuantConfig, quantize_model
    except ImportError as exc:
        raise QCompileError(f"int8 quantization is not available in this build ({exc}); "
                            "use --quantize none") from None
    config = quant_config if quant_config is not None else QuantConfig()
    say(f"quantizing {imported.name} to int8 for {spec.name} ...")
    source = getattr(calib, "source", None) or calib or imported.path
    try:
        result = quantize_model(imported, calib, config, spec)
    except ValueError as exc:
        # activations that overflow float32 reach the observers as +-inf; numpy's
        # histogram then refuses the range ("... is not finite")
        if "finite" not in str(exc):
            raise
        raise InputError(f"{source}: calibration gives non-finite activations "
                         f"({str(exc).splitlines()[0][:200]}): they overflow float32; "
                         "check the data's scale and preprocessing") from None
    summary = dict(result.summary)
    summary.setdefault("mode", "int8")
    _check_quant_params(summary, source)
    return result.mod, summary


def _check_quant_params(summary: dict, source) -> None:
    """Refuse a quantization whose ranges or scales are not finite: calibration data
    that overflows float32 in some activation gives a module that computes garbage."""
    import math

    tensors = summary.get("tensors")
    if not isinstance(tensors, dict):
        return
    for name, info in tensors.items():
        if not isinstance(info, dict):
            continue
        values = [info.get("scale"), *(info.get("range") or [])]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise InputError(f"{source}: calibration gives tensor '{name}' the range "
                             f"{info.get('range')} (scale {info.get('scale')}): activations "
                             "overflow float32; check the data's scale and preprocessing")


def _tuning_database(mod, spec, tuning_log, say):
    """The tuning database compile applies, and the manifest's account of it.

    ``tuning_log``: a directory from ``qcompile tune``; ``None``: the shipped
    ``tuning_logs/`` databases tuned for this target, used only where a kernel's
    workload matches (``QCOMPILE_NO_SHIPPED_TUNING=1`` or ``tuning_log=False`` turns
    that off). Either way only records that beat the default schedule when timed
    inside the model are applied (``qcompile.tune.load_database``)."""
    if tuning_log is False or (tuning_log is None and
                               os.environ.get("QCOMPILE_NO_SHIPPED_TUNING")):
        return None, {"log": None}
    try:
        from .tune import coverage_detail, load_database, shipped_log_dirs
    except ImportError as exc:
        if tuning_log is None:
            return None, {"log": None}
        raise QCompileError(f"tuning logs are not supported in this build ({exc})") from None
    shipped = tuning_log is None
    if shipped:
        dirs = shipped_log_dirs(spec)
        if not dirs:
            return None, {"log": None}
        import warnings

        with warnings.catch_warnings():  # the shipped logs' notes are not the user's problem
            warnings.simplefilter("ignore")
            database = load_database(dirs, spec)
        if not len(database.get_all_tuning_records()):  # no record beat a default schedule
            return None, {"log": None}
        tuning_log = ", ".join(str(d) for d in dirs)
    else:
        database = load_database(tuning_log, spec)  # only records valid for this target
    tuned, untuned = coverage_detail(mod, spec, database)
    if shipped and not tuned:
        return None, {"log": None}
    say(f"tuning log {tuning_log}: {len(tuned)} of {len(tuned) + len(untuned)} kernels use "
        "tuned records, the rest default schedules")
    return database, {"log": str(tuning_log), "shipped": shipped, "tuned_kernels": len(tuned),
                      "total_kernels": len(tuned) + len(untuned), "tuned": sorted(tuned)}


def _build(mod, spec: TargetSpec, database):
    from .pipeline import compile_relax

    try:
        return compile_relax(mod, spec, database)
    except QCompileError:
        raise
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BuildError(f"building for {spec.name} failed: {first[:400]}") from exc


def _export(executable, spec: TargetSpec, lib_path: Path) -> None:
    import tvm

    kwargs = {}
    where = f"{spec.path}: " if spec.path else ""
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise BuildError(f"{where}target {spec.name} links with '{spec.cross_compiler}', "
                             "which is not on PATH (Debian: apt-get install "
                             "g++-aarch64-linux-gnu)")
        kwargs["fcompile"] = tvm.support.cc.cross_compiler(spec.cross_compiler)
    try:
        executable.export_library(str(lib_path), **kwargs)
    except OSError as exc:
        raise BuildError(f"cannot write {lib_path}: {exc.strerror or exc}") from None
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = " ".join(lines[:2]) if lines else type(exc).__name__
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            raise BuildError(f"cannot write {lib_path}: no space left on the device") \
                from None
        raise BuildError(f"{where}exporting {lib_path.name} for {spec.name} failed: "
                         f"{first[:400]}") from exc


def _cuda_sources(executable) -> str:
    """All CUDA source embedded in the executable (empty for CPU targets)."""
    pending, sources = [executable.mod], []
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            sources.append(module.inspect_source("cuda"))
        pending.extend(module.imports)
    return "\n".join(sources)


def _cuda_ahead_of_time(executable, spec: TargetSpec, directory: Path, say) -> dict:
    """Keep the CUDA source and, where nvcc exists, compile it to a fatbin now.

    The library itself carries the source, which TVM compiles when it is loaded on a
    CUDA machine; the fatbin proves ahead of time that it compiles for the arch.
    """
    source = _cuda_sources(executable)
    (directory / "kernels.cu").write_text(source)
    info = {"source": "kernels.cu", "source_bytes": len(source), "fatbin": None}
    if shutil.which("nvcc") is None:
        info["note"] = "nvcc not on PATH: no ahead-of-time fatbin"
        return info
    from tvm.support import nvcc

    arch = spec.tvm.get("arch", "sm_80")
    supported = _nvcc_archs()
    if supported and arch.replace("sm_", "compute_") not in supported:
        info["note"] = (f"this nvcc does not support {arch} (it knows {supported[0]} and "
                        "newer): no ahead-of-time fatbin; the library's CUDA source is "
                        "compiled when loaded on the GPU")
        say(f"note: {info['note']}")
        return info
    say(f"nvcc: compiling CUDA kernels ahead of time for {arch} ...")
    try:
        with spec.tvm_target():  # nvcc's flags are read from the current target
            fatbin = nvcc.compile_cuda(source, target_format="fatbin", arch=[f"-arch={arch}"],
                                       compiler="nvcc")
    except Exception as exc:
        raise BuildError(f"nvcc failed to compile the CUDA kernels for {arch}: "
                         f"{str(exc).splitlines()[0] if str(exc) else exc}") from exc
    (directory / "kernels.fatbin").write_bytes(bytes(fatbin))
    info["fatbin"] = "kernels.fatbin"
    return info


def _nvcc_archs() -> list[str]:
    """``compute_XX`` names this nvcc can compile for (empty if it cannot say)."""
    import subprocess

    try:
        out = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().startswith("compute_")]


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def write_artifact(executable, imported: ImportedModel, spec: TargetSpec,
                   output_dir: str | os.PathLike, quant_summary: dict, tuning: dict,
                   build_seconds: float, say=None) -> Artifact:
    """Export into a temporary sibling directory, then rename it into place."""
    say = say or (lambda msg: None)
    final = Path(output_dir)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING_MARK}",
                                        dir=final.parent))
    except OSError as exc:
        raise BuildError(f"cannot create the artifact directory {final}: "
                         f"{exc.strerror or exc}") from None
    try:
        lib_path = staging / LIBRARY
        try:
            _export(executable, spec, lib_path)
        except BuildError as exc:  # name the directory the user asked for, not staging
            raise BuildError(str(exc).replace(str(staging), str(final))) from exc.__cause__
        extra = {}
        if spec.is_cuda:
            extra["cuda"] = _cuda_ahead_of_time(executable, spec, staging, say)
        manifest = {
            "format": FORMAT,
            "qcompile_version": __version__,
            "tvm_version": _tvm_version(),
            "python": sys.version.split()[0],
            "created_unix": int(time.time()),
            "model": {"name": imported.name, "path": os.path.abspath(imported.path),
                      "sha256": imported.sha256, "opset": imported.opset},
            "target": {"name": spec.name, "arch": spec.arch, "tvm": spec.resolved_tvm_dict(),
                       "host": spec.host, "int8_intrinsic": spec.int8_intrinsic,
                       "cross_compiler": spec.cross_compiler or None,
                       "rpc_key": spec.rpc_key},
            "inputs": [i.to_dict() for i in imported.inputs],
            "outputs": [o.to_dict() for o in imported.outputs],
            "library": {"file": LIBRARY, "sha256": sha256_file(lib_path),
                        "bytes": lib_path.stat().st_size},
            "quantization": quant_summary,
            "tuning": tuning,
            "build_seconds": round(build_seconds, 3),
            **extra,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an artifact is shared output
        _replace_dir(staging, final)
    except OSError as exc:  # disk full, permissions, a vanished directory
        shutil.rmtree(staging, ignore_errors=True)
        raise BuildError(f"cannot write the artifact {final}: {exc.strerror or exc}"
                         ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {final}/ ({LIBRARY} {manifest['library']['bytes']} bytes, {MANIFEST})")
    return Artifact(final, manifest)


def _replace_dir(staging: Path, final: Path) -> None:
    if final.exists():
        if not (final / MANIFEST).is_file() and any(final.iterdir()):
            raise BuildError(f"{final} exists and is not a qcompile artifact; refusing to "
                             "overwrite it (choose another -o)")
        if _exchange(staging, final):  # atomic: `final` is never missing
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old artifact
            return
        backup = final.with_name(f".{final.name}{BACKUP_MARK}{os.getpid()}")
        os.rename(final, backup)
        os.rename(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(staging, final)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where
    the system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                     rename_exchange) == 0


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    return str(value)
