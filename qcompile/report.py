"""Reports: JSON for machines, Markdown for people, PNG plots where a picture
reads faster. ``qcompile report DIR`` re-renders Markdown and plots from
``DIR/report.json``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclass
class Report:
    """What ``measure`` found. ``float`` and ``int8`` hold one section each:
    ``latency_ms`` {median, p90, mean, min, count, threads}, ``agreement``
    {top1, top5, cosine, sqnr_db, max_abs_err, reference, samples},
    ``accuracy`` (with labels), ``library_bytes``, ``weight_bytes``."""

    model: str
    target: str
    device: str
    emulated: bool = False
    float: dict | None = None
    int8: dict | None = None
    reference: dict | None = None
    quantization: dict | None = None
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_markdown(self) -> str:
        lines = [f"# qcompile report: {self.model} on {self.target}", ""]
        where = self.device + (" — **EMULATED (qemu): latencies are not board speed**"
                               if self.emulated else "")
        lines += [f"- device: {where}"]
        for key, value in self.environment.items():
            lines.append(f"- {key}: {value}")
        lines += ["", "| | float | int8 |", "| --- | --- | --- |"]
        for label, getter in _ROWS:
            lines.append(f"| {label} | {getter(self.float)} | {getter(self.int8)} |")
        if self.float and self.int8 and _lat(self.float) and _lat(self.int8):
            speedup = _lat(self.float) / _lat(self.int8)
            lines += ["", f"int8 speed-up over float (median latency): **{speedup:.2f}×**"
                      + (" (emulated)" if self.emulated else "")]
        if self.reference:
            lines += ["", f"Reference for agreement: {self.reference.get('kind')}"
                      f" ({self.reference.get('detail', '')})."]
            for label, value in (self.reference.get("latency_ms") or {}).items():
                lines.append(f"{label}: median {value:.3f} ms.")
        layers = (self.quantization or {}).get("layers")
        if isinstance(layers, list) and layers:
            lines += ["", "## Layers", "", "| layer | op | precision | SQNR (dB) |",
                      "| --- | --- | --- | --- |"]
            for layer in layers:
                sqnr = layer.get("sqnr_db")
                lines.append(f"| {layer.get('name')} | {layer.get('op', '')} | "
                             f"{layer.get('precision', 'int8')} | "
                             f"{'' if sqnr is None else f'{sqnr:.1f}'} |")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike, plots: bool = True) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.json", out / "report.md"]
        written[0].write_text(self.to_json())
        written[1].write_text(self.to_markdown())
        if plots:
            written += write_plots(self, out)
        return written


def _lat(section, key="median"):
    if not section or not section.get("latency_ms"):
        return None
    return section["latency_ms"].get(key)


def _fmt(value, spec=".3f", suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}{suffix}"


def _agree(section, key, spec=".4f", suffix=""):
    if not section or not section.get("agreement"):
        return "—"
    return _fmt(section["agreement"].get(key), spec, suffix)


def _pct(section, key):
    if not section or not section.get("agreement") or section["agreement"].get(key) is None:
        return "—"
    return f"{100 * section['agreement'][key]:.2f}%"


_ROWS = [
    ("latency median (ms)", lambda s: _fmt(_lat(s, "median"))),
    ("latency p90 (ms)", lambda s: _fmt(_lat(s, "p90"))),
    ("timed runs", lambda s: _fmt(s and s.get("latency_ms") and s["latency_ms"].get("count"), "d")),
    ("threads", lambda s: _fmt(s and s.get("latency_ms") and s["latency_ms"].get("threads"), "d")),
    ("accuracy (labels)", lambda s: "—" if not s or s.get("accuracy") is None
     else f"{100 * s['accuracy']:.2f}%"),
    ("top-1 agreement", lambda s: _pct(s, "top1")),
    ("top-5 agreement", lambda s: _pct(s, "top5")),
    ("cosine similarity", lambda s: _agree(s, "cosine", ".5f")),
    ("SQNR (dB)", lambda s: _agree(s, "sqnr_db", ".1f")),
    ("max abs error", lambda s: _agree(s, "max_abs_err", ".3g")),
    ("library size (bytes)", lambda s: _fmt(s and s.get("library_bytes"), ",d")),
    ("weight bytes", lambda s: _fmt(s and s.get("weight_bytes"), ",d")),
    ("kernels with a tuned record", lambda s: _tuned(s)),
]


def _tuned(section) -> str:
    """'1 of 8' (kernels a tuning record schedules, of all), 'none' (default schedules
    only), '—' (an artifact whose manifest does not say)."""
    tuning = section and section.get("tuning")
    if not tuning:
        return "—"
    if not tuning.get("tuned_kernels"):
        return "none"
    return f"{tuning['tuned_kernels']} of {tuning['total_kernels']}"


def latency_summary(samples_ms: list[float], threads: int | None) -> dict:
    values = np.asarray(samples_ms, dtype=np.float64)
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean()), "min": float(values.min()),
            "count": int(values.size), "threads": threads}


def compare_outputs(reference: list[np.ndarray], test: list[np.ndarray]) -> dict:
    """Agreement of ``test`` with ``reference`` (lists of per-sample first outputs)."""
    ref = np.concatenate([np.asarray(r, dtype=np.float64).reshape(len(r), -1)
                          for r in reference])
    out = np.concatenate([np.asarray(t, dtype=np.float64).reshape(len(t), -1) for t in test])
    if ref.shape != out.shape:
        raise InputError(f"outputs differ in shape: reference {ref.shape}, test {out.shape}")
    err = out - ref
    noise = float((err ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10.0 * math.log10(max(signal, 1e-30) / noise)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.where(norms > 0, (ref * out).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    result = {"cosine": float(cosine.mean()), "sqnr_db": sqnr,
              "max_abs_err": float(np.abs(err).max()), "samples": int(ref.shape[0]),
              "top1": None, "top5": None}
    if ref.shape[1] >= 2:  # a class vector: argmax agreement means something
        ref_top1 = ref.argmax(axis=1)
        result["top1"] = float((out.argmax(axis=1) == ref_top1).mean())
        if ref.shape[1] > 5:
            top5 = np.argsort(-ref, axis=1)[:, :5]
            result["top5"] = float((top5 == out.argmax(axis=1)[:, None]).any(axis=1).mean())
    return result


def accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    logits = np.concatenate([np.asarray(o).reshape(len(o), -1) for o in outputs])
    return float((logits.argmax(axis=1) == np.asarray(labels)[:len(logits)]).mean())


def write_plots(report: Report, out: Path) -> list[Path]:
    """Latency bars (float vs int8) and per-layer SQNR, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.notes.append("matplotlib not installed: no plots (pip install qcompile[plot])")
        return []
    written = []
    bars = [(name, _lat(sec), _lat(sec, "p90")) for name, sec in
            (("qcompile float", report.float), ("qcompile int8", report.int8)) if _lat(sec)]
    for label, value in ((report.reference or {}).get("latency_ms") or {}).items():
        bars.append((label, value, None))
    bars = [b for b in bars if _finite(b[1])]  # NaN/Inf cannot be drawn
    if bars:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = [b[0] for b in bars]
        ax.barh(names, [b[1] for b in bars], color=["#4C72B0", "#DD8452", "#999999",
                                                   "#BBBBBB"][:len(bars)])
        for index, (_, median, p90) in enumerate(bars):
            ax.text(median, index, f" {median:.3f} ms", va="center")
        title = f"{report.model} on {report.target}: median latency"
        ax.set_title(title + (" (EMULATED)" if report.emulated else ""), fontsize=9)
        ax.set_xlabel("ms (lower is better)")
        ax.set_xlim(0, max(b[1] for b in bars) * 1.35)
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    layers = [layer for layer in (report.quantization or {}).get("layers", []) or []
              if isinstance(layer, dict) and _finite(layer.get("sqnr_db"))]
    if layers:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(layers) + 1.2))
        ax.barh([layer["name"] for layer in layers], [layer["sqnr_db"] for layer in layers],
                color="#55A868")
        ax.invert_yaxis()
        ax.set_xlabel("SQNR vs float (dB, higher is better)")
        ax.set_title(f"{report.model}: per-layer quantization error", fontsize=9)
        fig.tight_layout()
        path = out / "layers.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def rerender(directory: str | os.PathLike) -> list[Path]:
    path = Path(directory) / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no report.json here; run qcompile measure first") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a report") from None
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors, deep nesting
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a qcompile report ({first})") from None
    _check_report(data, path)
    report = Report.from_json(json.dumps(data))
    return report.write(directory)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _check_report(data, path: Path) -> None:
    """The fields ``to_markdown`` and the plots read, with the types they need."""
    def bad(what: str):
        raise InputError(f"{path}: not a qcompile report ({what})")

    def number(value, where, finite=False):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad(f"{where} must be a number, not {type(value).__name__}")
        if finite and not math.isfinite(value):
            bad(f"{where} must be finite, not {value}")

    def table(value, where):
        if value is not None and not isinstance(value, dict):
            bad(f"{where} must be a JSON object")
        return value or {}

    if not isinstance(data, dict):
        bad("the top level must be a JSON object")
    for key in ("model", "target", "device"):
        if not isinstance(data.get(key), str):
            bad(f"'{key}' must be a string")
    if not isinstance(data.get("notes", []), list) or \
            not all(isinstance(n, str) for n in data.get("notes", [])):
        bad("'notes' must be a list of strings")
    table(data.get("environment"), "'environment'")
    for kind in ("float", "int8"):
        section = table(data.get(kind), f"'{kind}'")
        latency = table(section.get("latency_ms"), f"'{kind}.latency_ms'")
        for key in ("median", "p90", "mean", "min"):
            number(latency.get(key), f"'{kind}.latency_ms.{key}'", finite=True)
        for key in ("count", "threads"):
            if latency.get(key) is not None and type(latency[key]) is not int:
                bad(f"'{kind}.latency_ms.{key}' must be an integer")
        agreement = table(section.get("agreement"), f"'{kind}.agreement'")
        for key in ("top1", "top5", "cosine", "sqnr_db", "max_abs_err"):
            number(agreement.get(key), f"'{kind}.agreement.{key}'")
        number(section.get("accuracy"), f"'{kind}.accuracy'")
        for key in ("library_bytes", "weight_bytes"):
            if section.get(key) is not None and type(section[key]) is not int:
                bad(f"'{kind}.{key}' must be an integer")
    reference = table(data.get("reference"), "'reference'")
    for label, value in table(reference.get("latency_ms"), "'reference.latency_ms'").items():
        number(value, f"'reference.latency_ms.{label}'", finite=True)
    layers = table(data.get("quantization"), "'quantization'").get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            bad("'quantization.layers' must be a list of objects")
        for layer in layers:
            number(layer.get("sqnr_db"), "a layer's sqnr_db")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
