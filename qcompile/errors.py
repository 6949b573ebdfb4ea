"""One exception hierarchy for every user-facing failure.

Messages name what the user can act on: the file, the model node, the op and
what to do next. Code inside qcompile raises these instead of letting a TVM
traceback reach the user.
"""


class QCompileError(Exception):
    """Base class: anything qcompile reports as a user-visible failure."""


class ModelError(QCompileError):
    """The ONNX model cannot be read, checked or imported."""


class UnsupportedOpError(ModelError):
    """A node whose op the importer (or quantizer) cannot take."""

    def __init__(self, node_name, op_type, opset, path=None, hint=""):
        self.node_name = node_name
        self.op_type = op_type
        self.opset = opset
        where = f"{path}: " if path else ""
        msg = (f"{where}node '{node_name}' uses op {op_type} (opset {opset}), "
               f"which qcompile cannot import")
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class InputError(QCompileError):
    """Input data (shapes, dtypes, calibration or evaluation data) is wrong."""


class TargetError(QCompileError):
    """A target descriptor is missing, malformed or unusable here."""


class BuildError(QCompileError):
    """Compiling or exporting the module failed."""


class ArtifactError(QCompileError):
    """An artifact directory is missing files or fails its integrity check."""


class TuningError(QCompileError):
    """A tuning run or tuning database is unusable."""


class DeviceError(QCompileError):
    """A device, board or RPC server cannot be reached or failed mid-run."""
