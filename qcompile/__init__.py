"""qcompile: an int8 quantizing compiler for ONNX models, built on Apache TVM.

The public API mirrors the CLI verbs; each returns a plain object::

    imported = qcompile.import_onnx("model.onnx")          # Relax IRModule + I/O info
    artifact = qcompile.compile_model("model.onnx", "x86_64-avx2", "out/")
    runner   = qcompile.load("out/")                        # hash-checked, runnable
    report   = qcompile.measure("model.onnx", target="host", data="data.npz")

Attributes are imported lazily so that ``import qcompile`` (and the CLI's
``--help``) does not pay for importing TVM.
"""

__version__ = "0.1.0"

_LAZY = {
    "import_onnx": ("qcompile.frontend", "import_onnx"),
    "compile_model": ("qcompile.build", "compile_model"),
    "Artifact": ("qcompile.build", "Artifact"),
    "load": ("qcompile.artifact", "load"),
    "measure": ("qcompile.measure", "measure"),
    "Report": ("qcompile.report", "Report"),
    "get_target": ("qcompile.target", "get_target"),
    "list_targets": ("qcompile.target", "list_targets"),
    "QCompileError": ("qcompile.errors", "QCompileError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
