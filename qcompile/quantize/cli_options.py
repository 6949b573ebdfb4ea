"""Command-line options of the quantizer, for the CLI's ``compile`` verb.

``add_arguments(parser)`` adds the options (in their own argument group);
``config_from_args(args, spec)`` turns the parsed namespace into a
:class:`~qcompile.quantize.QuantConfig`. The CLI adds ``--quantize`` and
``--calib`` itself.
"""

from __future__ import annotations

import argparse

from .observers import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("int8 quantization (with --quantize int8)")
    group.add_argument("--calib-method", choices=METHODS, default="mse",
                       help="how activation ranges are chosen from the calibration data "
                            "(default: mse -- the range minimising the squared quantization "
                            "error)")
    group.add_argument("--percentile", type=float, default=99.99,
                       help="percentile for --calib-method percentile (default: 99.99)")
    group.add_argument("--per-tensor", action="store_true",
                       help="one weight scale per tensor instead of per output channel")
    group.add_argument("--act-dtype", choices=("uint8", "int8"), default="uint8",
                       help="activations: uint8 asymmetric (default) or int8 symmetric")
    group.add_argument("--skip", action="append", default=[], metavar="NAME_OR_OP",
                       help="keep a layer in float: an ONNX node name (e.g. /0/Conv) or an op "
                            "type (Conv, Gemm, MatMul); repeatable")
    rr = group.add_mutually_exclusive_group()
    rr.add_argument("--reduce-range", dest="reduce_range", action="store_true", default=None,
                    help="7-bit weights (avoids int16 saturation of AVX2 vpmaddubsw); the "
                         "default for x86_64-avx2")
    rr.add_argument("--no-reduce-range", dest="reduce_range", action="store_false",
                    help="full 8-bit weights even where the target defaults to 7-bit")
    group.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                       help="keep the most sensitive layers in float until top-1 (agreement "
                            "with float, or accuracy when the data has labels) is within "
                            "POINTS of float")
    group.add_argument("--min-output-sqnr", type=float, default=None, metavar="DB",
                       help="accuracy fallback target: also (or only) require the model-output "
                            "SQNR vs float on the evaluation data to be at least DB")
    group.add_argument("--fallback-search", choices=("greedy", "bisect"), default="greedy",
                       help="accuracy fallback: move layers to float one at a time (greedy, "
                            "one build each) or bisect the sensitivity order (fewer builds, "
                            "for models with many layers)")
    group.add_argument("--sensitivity", choices=("isolated", "local"), default="isolated",
                       help="accuracy fallback: rank layers by the model-output SQNR with only "
                            "that layer int8 (isolated: one build per layer) or by the layer's "
                            "own output SQNR on calibration inputs (local: no builds)")
    group.add_argument("--act-range", choices=("observer", "output"), default="observer",
                       help="activation clip ranges: the calibration method's own (observer) "
                            "or the candidate range with the least error in the consuming "
                            "layers' outputs (output)")
    group.add_argument("--accuracy-data", default=None, metavar="NPZ",
                       help="evaluation data for --max-accuracy-drop: an .npz with the model "
                            "inputs and optionally 'labels' (default: the calibration data, "
                            "measuring top-1 agreement with float)")
    group.add_argument("--requant", choices=("float", "fixed"), default="float",
                       help="requantize epilogue: float32 multiply (default, faster on x86) or "
                            "int64 fixed-point multiply + shift")
    group.add_argument("--calib-limit", type=int, default=None, metavar="N",
                       help="use at most N calibration samples")
    group.add_argument("--no-sqnr", action="store_true",
                       help="skip the per-layer SQNR measurement in the summary")
    group.add_argument("--dynamic", action="store_true",
                       help="dynamic quantization: matmul/Gemm layers with activation scales "
                            "computed at run time (no --calib needed); convolutions stay float")
    bc = group.add_mutually_exclusive_group()
    bc.add_argument("--bias-correction", dest="bias_correction", action="store_true",
                    default=True,
                    help="subtract the mean output shift caused by weight rounding (weight "
                         "error x per-channel input mean) from each bias (default: on)")
    bc.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                    help="keep the model's biases as they are")
    eq = group.add_mutually_exclusive_group()
    # a flag, not "--equalize [MODE]": an optional value would swallow the model path
    # that follows it on the command line
    eq.add_argument("--equalize", dest="equalize", action="store_const", const="activations",
                    default=None,
                    help="cross-layer equalization before calibration: rescale consecutive "
                         "conv/matmul pairs (e.g. expand -> depthwise -> pointwise) and "
                         "residual streams channel by channel from the measured channel "
                         "ranges (one more float pass); the float function is unchanged. "
                         "Helps MobileNetV2 (+2 dB), not EfficientNet-Lite0: off by default")
    eq.add_argument("--equalize-data-free", dest="equalize", action="store_const",
                    const="weights",
                    help="cross-layer equalization from weight ranges only (Nagel et al.)")
    eq.add_argument("--no-equalize", dest="equalize", action="store_const", const=None,
                    help="no cross-layer equalization")
    group.add_argument("--weight-scale", choices=("minmax", "mse"), default="minmax",
                       help="per-channel weight scale: minmax (max|w| / 127, nothing "
                            "clipped) or mse (the clip ratio in [0.5, 1] of max|w| with the "
                            "least weight quantization error, per channel)")
    group.add_argument("--weight-rounding", choices=("nearest", "gptq"), default="gptq",
                       help="nearest, or gptq: round weights so each layer's output error "
                            "on calibration inputs is small (same scales and kernels)")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bar over calibration batches")


def config_from_args(args: argparse.Namespace, spec=None):
    """A QuantConfig from parsed arguments (``spec`` decides reduce_range when not given)."""
    from . import QuantConfig

    reduce_range = getattr(args, "reduce_range", None)
    if reduce_range is None and spec is not None:
        reduce_range = bool(spec.reduce_range)
    config = QuantConfig(
        method=getattr(args, "calib_method", "mse"),
        percentile=getattr(args, "percentile", 99.99),
        per_channel=not getattr(args, "per_tensor", False),
        act_dtype=getattr(args, "act_dtype", "uint8"),
        reduce_range=reduce_range,
        skip=tuple(getattr(args, "skip", None) or ()),
        max_accuracy_drop=getattr(args, "max_accuracy_drop", None),
        eval_data=getattr(args, "accuracy_data", None),
        min_output_sqnr=getattr(args, "min_output_sqnr", None),
        fallback_search=getattr(args, "fallback_search", "greedy"),
        act_range=getattr(args, "act_range", "observer"),
        sensitivity=getattr(args, "sensitivity", "isolated"),
        requant=getattr(args, "requant", "float"),
        weight_scale=getattr(args, "weight_scale", "minmax"),
        weight_rounding=getattr(args, "weight_rounding", "gptq"),
        dynamic=getattr(args, "dynamic", False),
        bias_correction=getattr(args, "bias_correction", True),
        equalize=getattr(args, "equalize", None),
        sqnr=not getattr(args, "no_sqnr", False),
        calib_limit=getattr(args, "calib_limit", None),
        progress=False if getattr(args, "no_progress", False) else None,
    )
    config.validate()
    return config
