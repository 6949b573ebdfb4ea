"""Target descriptors: one TOML file per target, turned into a TVM Target.

A descriptor names the TVM target (as a dict, the only form TVM 0.27 takes),
the host target, the cross compiler that links the exported library, the int8
intrinsic family the schedules should use and the default RPC key. A new board
is a new TOML file, passed as ``--target path/to/board.toml``.

Nothing here imports TVM at module import time: ``qcompile targets`` must be
fast. TVM objects are made on demand by :meth:`TargetSpec.tvm_target`.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import TargetError

REQUIRED_KEYS = ("name", "arch", "int8_intrinsic", "tvm")
# /proc/cpuinfo flag names for the ISA features a descriptor may list.
_CPUINFO_ALIASES = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm"}


@dataclass(frozen=True)
class TargetSpec:
    """One target descriptor, as read from its TOML file."""

    name: str
    arch: str  # "x86_64", "aarch64" or "cuda"
    description: str
    isa_features: tuple[str, ...]
    int8_intrinsic: str
    reduce_range: bool
    cross_compiler: str
    rpc_key: str
    num_cores: int | str
    tvm: dict = field(hash=False, compare=False)
    host: dict | None = field(default=None, hash=False, compare=False)
    path: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.tvm.get("kind") == "cuda"

    @property
    def is_cross(self) -> bool:
        """True when the library is linked with a cross compiler (runs on a board)."""
        return bool(self.cross_compiler)

    def runs_here(self) -> bool:
        """Whether a library built for this target can run on this machine."""
        if self.is_cuda:
            return False
        if self.arch != platform.machine():
            return False
        have = host_cpu_features()
        if not all(_CPUINFO_ALIASES.get(f, f) in have for f in self.isa_features):
            return False
        # AMX: the CPU flag is not enough, the kernel must also hand out tile state
        return "amx_tile" not in self.isa_features or amx_permitted()

    def resolved_tvm_dict(self) -> dict:
        """The TVM target dict with ``mcpu = "host"`` and ``num-cores`` resolved."""
        spec = copy.deepcopy(self.tvm)
        if spec.get("kind") == "llvm":
            if spec.get("mcpu") == "host":
                spec["mcpu"] = self._host_mcpu(spec.pop("fallback_mcpu", "x86-64-v3"))
            else:
                spec.pop("fallback_mcpu", None)
            spec.setdefault("num-cores", self.cores())
        return spec

    def cores(self) -> int:
        if self.num_cores == "host" or self.num_cores is None:
            return os.cpu_count() or 1
        return int(self.num_cores)

    def tvm_target(self):
        """The ``tvm.target.Target`` for this descriptor (host attached for CUDA)."""
        from tvm.target import Target

        try:
            if self.host is not None:
                return Target(self.resolved_tvm_dict(), host=dict(self.host))
            return Target(self.resolved_tvm_dict())
        except Exception as exc:  # TVM raises its own error types for bad dicts
            raise TargetError(f"{self.path or self.name}: TVM rejects the target "
                              f"{self.resolved_tvm_dict()}: {exc}") from None

    def _host_mcpu(self, fallback: str) -> str:
        """This machine's CPU name, unless it has ISA this target must not use."""
        if self.arch != platform.machine():
            return fallback
        extra_isa = {"avx512f"} - set(self.isa_features)
        if extra_isa & host_cpu_features():
            return fallback
        from tvm.target import codegen

        return codegen.llvm_get_system_cpu() or fallback


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str]:
    """CPU flags of this machine from /proc/cpuinfo (empty set where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def amx_permitted() -> bool:
    """Whether Linux grants this process AMX tile data (``arch_prctl`` with
    ARCH_REQ_XCOMP_PERM, kernel 5.16+); AMX code run without it dies with SIGILL."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    import ctypes

    from qcompile.schedules.amx import (ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL,
                                        XFEATURE_XTILEDATA)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _bundled_dir() -> Path:
    return Path(str(resources.files("qcompile.targets")))


def bundled_target_files() -> list[Path]:
    return sorted(_bundled_dir().glob("*.toml"))


def load_spec(path: str | os.PathLike) -> TargetSpec:
    """Read one descriptor file; errors name the file and the bad key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetError(f"{path}: cannot read target descriptor: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TargetError(f"{path}: not a UTF-8 text file; a target descriptor is TOML"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise TargetError(f"{path}: not valid TOML: nested too deeply") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise TargetError(f"{path}: target descriptor lacks {', '.join(missing)}")
    if not isinstance(data["tvm"], dict) or "kind" not in data["tvm"]:
        raise TargetError(f"{path}: [tvm] must be a table with at least `kind`")
    _check_descriptor(data, path)
    return TargetSpec(
        name=str(data["name"]),
        arch=str(data["arch"]),
        description=str(data.get("description", "")),
        isa_features=tuple(data.get("isa_features", ())),
        int8_intrinsic=str(data["int8_intrinsic"]),
        reduce_range=bool(data.get("reduce_range", False)),
        cross_compiler=str(data.get("cross_compiler", "")),
        rpc_key=str(data.get("rpc_key", data["name"])),
        num_cores=data.get("num_cores", "host"),
        tvm=dict(data["tvm"]),
        host=dict(data["host"]) if "host" in data else None,
        path=str(path),
    )


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ARCHES = ("x86_64", "aarch64", "cuda")


def _check_descriptor(data: dict, path: Path) -> None:
    """Types and values of the keys, so that a bad file fails here, naming itself."""
    def bad(what: str):
        raise TargetError(f"{path}: {what}")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".toml"):
        bad(f"name {name!r} must be a plain name (letters, digits, '_', '.', '+', '-')")
    if data["arch"] not in ARCHES:
        bad(f"arch {data['arch']!r} must be one of {', '.join(ARCHES)}")
    for key in ("int8_intrinsic", "description", "cross_compiler", "rpc_key"):
        if key in data and not isinstance(data[key], str):
            bad(f"{key} must be a string")
    features = data.get("isa_features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        bad("isa_features must be a list of strings, e.g. [\"avx2\", \"fma\"]")
    if not isinstance(data.get("reduce_range", False), bool):
        bad("reduce_range must be true or false")
    cores = data.get("num_cores", "host")
    if cores != "host" and (type(cores) is not int or not 1 <= cores <= 4096):
        bad(f"num_cores {cores!r} must be a positive integer or \"host\"")
    tvm_cores = data["tvm"].get("num-cores")
    if tvm_cores is not None and (type(tvm_cores) is not int or not 1 <= tvm_cores <= 4096):
        bad(f"[tvm] num-cores {tvm_cores!r} must be a positive integer")
    if "host" in data and (not isinstance(data["host"], dict) or "kind" not in data["host"]):
        bad("[host] must be a table with at least `kind`")


def list_targets() -> list[TargetSpec]:
    return [load_spec(p) for p in bundled_target_files()]


def host_target_name() -> str:
    """The best bundled target that runs on this machine."""
    for name in ("x86_64-amx", "x86_64-avx512-vnni", "x86_64-avx2", "aarch64-neon-dotprod",
                 "aarch64-neon"):
        if get_target(name).runs_here():
            return name
    raise TargetError(f"no bundled target runs on this {platform.machine()} machine; "
                      "pass --target path/to/board.toml")


def get_target(name_or_path: str | os.PathLike | TargetSpec | None = None) -> TargetSpec:
    """A bundled target by name, a descriptor by path, or (None / "host") this machine."""
    if isinstance(name_or_path, TargetSpec):
        return name_or_path
    if name_or_path in (None, "host"):
        return get_target(host_target_name())
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return load_spec(text)
    candidate = _bundled_dir() / f"{text}.toml"
    if candidate.is_file():
        return load_spec(candidate)
    known = ", ".join(p.stem for p in bundled_target_files())
    raise TargetError(f"unknown target '{text}'; known targets: {known} "
                      "(or pass a path to a .toml descriptor)")
