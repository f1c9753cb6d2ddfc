"""`hf-msam compare RUN_DIR [RUN_DIR ...] --output report`: one table and one figure for several training runs.

For each run directory (a Trainer `output_dir`) it reads `trainer_state.json`, the training and
evaluation logs (from the latest `checkpoint-*` when the run saved no state of its own), and when
present `all_results.json` (the final metrics `trainer.save_metrics` writes), `loss_landscape.json`
(`--msam_eval_landscape`) and `training_args.bin` (the mSAM settings). It writes OUTPUT.md, one row a
run, and OUTPUT.png: training loss, an evaluation metric and the logged mSAM sharpness against steps,
and the loss landscapes when the runs have them. A run whose files are missing or malformed is
reported and skipped; the others still make the report.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .flatness import LANDSCAPE_JSON, LossLandscape, new_figure

__all__ = ["Run", "RunError", "eigenvalue_cell", "load_run", "main", "plot_runs", "write_report"]

STATE, RESULTS, ARGS = "trainer_state.json", "all_results.json", "training_args.bin"
FLATNESS = {"eval_hessian_top_eigenvalue": "λ_max(H)", "eval_hessian_trace": "tr(H)", "eval_sharpness": "sharpness"}
# `--msam_eval_quantization`: the change of the evaluation loss (accuracy) with the weights rounded to b bits
QUANTIZATION = {f"eval_int{b}_{what}_delta": f"Δ{what} int{b}" for what in ("loss", "accuracy") for b in (8, 4, 3)}
# Evaluation numbers that say how fast, not how good (also with a dataset's name: eval_test_runtime).
NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")
# Power iteration finds the Hessian eigenvalue of largest magnitude: the top one at a minimum, a negative one elsewhere.
NEGATIVE_EIGENVALUE_MARK = "†"
NEGATIVE_EIGENVALUE_NOTE = (
    f"{NEGATIVE_EIGENVALUE_MARK} Negative: λ_max(H) is the Hessian eigenvalue of largest magnitude that power iteration "
    "finds, which is the top one only at a minimum. A negative one means a direction of strong negative curvature "
    "dominates: the weights are not at a minimum of the evaluation loss, and the number does not say the run is flat."
)


class RunError(Exception):
    """A run directory that cannot be reported, and why."""


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


class _Opaque:
    """Stands for every class or function `training_args.bin` names: it only keeps the attributes it is given."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


class _AttributesUnpickler(pickle.Unpickler):
    # A pickle names the callables that rebuild it: hand it `_Opaque` instead, so that reading a run
    # never imports nor runs anything (and needs neither transformers nor the run's own classes).
    def find_class(self, module: str, name: str) -> type:
        return _Opaque

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages: training arguments hold none we read


def _read_settings(path: Path) -> dict[str, Any]:
    """The `msam_*` attributes of the `TrainingArguments` that `torch.save` wrote to `path` (empty: a plain run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            args = _AttributesUnpickler(io.BytesIO(archive.read(pickled))).load()
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, ValueError) as error:
        reason = error or type(error).__name__
        raise RunError(f"{path.name} is not a torch.save file of training arguments ({reason})") from error
    if not isinstance(args, _Opaque):
        raise RunError(f"{path.name} holds a {type(args).__name__}, not training arguments")
    settings = {k: v for k, v in vars(args).items() if k.startswith("msam_")}
    return {k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str, type(None)))}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path.name} is unreadable: {error}") from error
    if not isinstance(data, dict):
        raise RunError(f"{path.name} should hold a JSON object, found a {type(data).__name__}")
    return data


@dataclass
class Run:
    """What `compare` knows of one run."""

    name: str
    directory: Path
    log_history: list[dict[str, Any]]
    global_step: int
    results: dict[str, Any]  # all_results.json; empty when absent
    settings: dict[str, Any] | None  # msam_* of training_args.bin; None when absent
    landscape: LossLandscape | None

    def final(self, key: str) -> Any:
        """The run's final `key`: from all_results.json, else its last logged value; None if neither has it."""
        if key in self.results:
            return self.results[key]
        return next((log[key] for log in reversed(self.log_history) if key in log), None)

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of every logged `key`."""
        logs = [log for log in self.log_history if "step" in log and isinstance(log.get(key), (int, float))]
        points = [(log["step"], log[key]) for log in logs]
        return [s for s, _ in points], [v for _, v in points]

    @property
    def label(self) -> str:
        """The run's name and mSAM settings, for legends."""
        if not self.settings or "msam_rho" not in self.settings:
            return self.name
        parts = [f"ρ={self.settings['msam_rho']:g}" if self.settings["msam_rho"] else "ρ=0, no mSAM"]
        if self.settings["msam_rho"] and self.settings.get("msam_micro_batch_size"):
            parts.append(f"micro-batch {self.settings['msam_micro_batch_size']}")
        if self.settings["msam_rho"] and self.settings.get("msam_adaptive"):
            parts.append("ASAM")
        return f"{self.name} ({', '.join(parts)})"


def _latest_checkpoint(directory: Path) -> Path | None:
    steps = {p: p.name.removeprefix("checkpoint-") for p in directory.glob("checkpoint-*") if (p / STATE).is_file()}
    return max((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]), default=None)


def load_run(directory: str | Path, name: str | None = None) -> Run:
    """Read a run directory; `RunError` says why it cannot be reported."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RunError("not a directory")
    state_dir = directory if (directory / STATE).is_file() else _latest_checkpoint(directory)
    if state_dir is None:
        raise RunError(f"no {STATE}, here or in a checkpoint-* (save it with trainer.save_state())")
    state = _read_json(state_dir / STATE)
    log_history = state.get("log_history")
    if not isinstance(log_history, list) or not all(isinstance(log, dict) for log in log_history):
        raise RunError(f"{STATE} has no log_history list")
    results = _read_json(directory / RESULTS) if (directory / RESULTS).is_file() else {}
    landscape = None
    if (directory / LANDSCAPE_JSON).is_file():
        try:
            landscape = LossLandscape.from_json(directory / LANDSCAPE_JSON)
        except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise RunError(f"{LANDSCAPE_JSON} is unreadable: {error}") from error
    args_path = next((d / ARGS for d in (directory, state_dir) if (d / ARGS).is_file()), None)
    return Run(
        name=name or directory.resolve().name,
        directory=directory,
        log_history=log_history,
        global_step=state.get("global_step", 0),
        results=results,
        settings=None if args_path is None else _read_settings(args_path),
        landscape=landscape,
    )


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _lines(text: Any) -> list[str]:
    return str(text).splitlines() or [""]


def _text(text: Any, in_table: bool = True) -> str:
    """`text` on one Markdown line: line breaks written `<br>`; in a table cell, where a `|` would end the cell,
    pipes escaped."""
    return "<br>".join(line.replace("|", "\\|") if in_table else line for line in _lines(text))


def _code(text: Any, in_table: bool = True) -> str:
    """`text` as inline code (a run's name) on one Markdown line: each line its own code span, its fence one
    backtick longer than any run of backticks it holds, the lines joined by `<br>`; in a table cell, pipes
    escaped (GFM unescapes them inside code spans there too)."""
    spans = []
    for line in _lines(text):
        if line:
            fence = "`" * (max(map(len, re.findall("`+", line)), default=0) + 1)
            # CommonMark strips one space from each end of a span that starts and ends with one: pad such a line,
            # and one that starts or ends with a backtick, so that its text comes out whole.
            padded = line[0] == "`" or line[-1] == "`" or (line[0] == line[-1] == " " and line.strip() != "")
            line = f" {line} " if padded else line
            spans.append(fence + (line.replace("|", "\\|") if in_table else line) + fence)
        else:
            spans.append("")
    return "<br>".join(spans)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else _text(value)
    return f"{value:.4g}"


def eigenvalue_cell(value: Any) -> str:
    """A table cell for `eval_hessian_top_eigenvalue`, marked when negative (see `NEGATIVE_EIGENVALUE_NOTE`)."""
    negative = isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0
    return _number(value) + (f" {NEGATIVE_EIGENVALUE_MARK}" if negative else "")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _settings_cells(run: Run) -> list[str]:
    """ρ, micro-batch, ASAM; "?" when the run saved no training_args.bin, "—" for plain TrainingArguments."""
    if run.settings is None:
        return ["?"] * 3
    if "msam_rho" not in run.settings:
        return ["—"] * 3
    rho = run.settings["msam_rho"]
    micro_batch = run.settings.get("msam_micro_batch_size")
    adaptive = run.settings.get("msam_adaptive")
    return [
        f"{rho:g}" if rho else "0 (off)",
        "whole batch" if micro_batch is None else str(micro_batch),
        f"yes (η={run.settings.get('msam_adaptive_eta', 0.01):g})" if adaptive else "no",
    ]


def _quantization_backend_cell(run: Run) -> str:
    """`--msam_quantization_backend`: "?" when the run saved no training_args.bin; simulated, the default, otherwise."""
    if run.settings is None:
        return "?"
    return _text(run.settings.get("msam_quantization_backend", "simulated"))


def _eval_metrics(runs: list[Run]) -> list[str]:
    """The final evaluation metrics any run has, eval_loss first."""
    keys = {k for run in runs for k in (*run.results, *(k for log in run.log_history for k in log))}
    keys = {k for k in keys if k.startswith("eval_") and not k.endswith(NOT_METRICS) and k not in FLATNESS
            and k not in QUANTIZATION}
    return sorted(keys, key=lambda k: (k != "eval_loss", k))


def write_report(runs: list[Run], skipped: list[tuple[str, str]], path: Path, figure: str | None) -> None:
    """The Markdown report: one row a run, the figure below, then the runs that were skipped."""
    metrics = _eval_metrics(runs)
    quantized = [k for k in QUANTIZATION if any(run.final(k) is not None for run in runs)]
    # Which backend quantized: a column once a run used another than the default (simulated) one, or may have.
    backends = quantized and any(_quantization_backend_cell(run) != "simulated" for run in runs
                                 if any(run.final(k) is not None for k in quantized))  # fmt: skip
    header = ["run", "ρ", "micro-batch", "ASAM", "steps", *metrics, *FLATNESS.values(),
              *(QUANTIZATION[k] for k in quantized), *(["quantization"] if backends else []), "train time"]
    rows = [
        [
            _code(run.name),
            *_settings_cells(run),
            str(run.global_step),
            *(_number(run.final(k)) for k in metrics),
            *((eigenvalue_cell if k == "eval_hessian_top_eigenvalue" else _number)(run.final(k)) for k in FLATNESS),
            *(_number(run.final(k)) for k in quantized),
            *([_quantization_backend_cell(run)] if backends else []),
            _duration(run.final("train_runtime")),
        ]
        for run in runs
    ]
    lines = [
        "# hf-msam compare",
        "",
        f"{len(runs)} run(s). Metrics are the final evaluation's. λ_max(H) is the eigenvalue of largest magnitude of the "
        "Hessian of the evaluation loss (its top eigenvalue at a minimum), tr(H) its trace, sharpness the mean rise of "
        "that loss under the SAM perturbation at `--msam_flatness_rho` "
        "(`--msam_eval_flatness`; lower means flatter). ρ, micro-batch and ASAM are the mSAM settings (ρ = 0: plain "
        "training; ?: no training_args.bin)."
        + (" Δloss intb (Δaccuracy intb) is the change of the evaluation loss (accuracy) with every linear layer's "
           "weights rounded to b bits, symmetric per output row (`--msam_eval_quantization`; smaller means more robust "
           "to quantization)." if quantized else "")
        + (" quantization is the run's `--msam_quantization_backend`: simulated (weights rounded in place to "
           "±(2^(b−1) − 1)) or torchao (torchao's weight-only configs, integers in [−2^(b−1), 2^(b−1) − 1]): "
           "compare the Δ of runs with the same one." if backends else ""),
        "",
        "| " + " | ".join(map(_text, header)) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if any(eigenvalue_cell(run.final("eval_hessian_top_eigenvalue")).endswith(NEGATIVE_EIGENVALUE_MARK) for run in runs):
        lines += ["", NEGATIVE_EIGENVALUE_NOTE]
    if figure:
        lines += ["", f"![Training loss, evaluation metric, mSAM sharpness and loss landscape of each run]({figure})"]
    if skipped:
        lines += ["", "## Skipped", "", *(f"- {_code(directory, False)}: {_text(reason, False)}" for directory, reason in skipped)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


def _landscape_curve(landscape: LossLandscape) -> list[float] | None:
    """The 1-D curve along d₁; for a 2-D landscape, its β = 0 row when the grid has one."""
    if landscape.directions == 1:
        return landscape.losses
    steps = len(landscape.coordinates)
    return [row[steps // 2] for row in landscape.losses] if steps % 2 else None


def plot_runs(runs: list[Run], path: Path, metric: str = "eval_loss") -> Any:
    """Training loss, `metric` and msam/sharpness against steps (and the loss landscapes), one color a run.

    A run evaluated only at the end (no `metric` in its logs, but in all_results.json) gets one point at its last
    step. Returns the matplotlib `Figure` (panels in `fig.axes`, in that order), which is also saved to `path`."""
    panels = [
        ("loss", "Training loss", "loss"),
        (metric, f"Evaluation: {metric}", metric),
        ("msam/sharpness", "mSAM sharpness during training, at each run's own ρ (ρ > 0)", "L(w + e) − L(w), per step"),
    ]
    curves = [run.landscape and _landscape_curve(run.landscape) for run in runs]
    with_landscape = any(curve is not None for curve in curves)
    fig = new_figure(figsize=(13, 9.5 if with_landscape else 5))
    axes = fig.subplots(2, 2).flatten() if with_landscape else fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    lines = []
    for ax, (key, title, ylabel) in zip(axes, panels):
        missing, final_only = [], False
        for run, color in zip(runs, colors):
            steps, values = run.curve(key)
            final = run.final(key) if key == metric else None
            if steps:
                ax.plot(steps, values, color=color, marker="o", markersize=3)
            elif isinstance(final, (int, float)) and not isinstance(final, bool):
                # Evaluated only at the end (--eval_strategy no, then trainer.evaluate()): one point at the last step.
                ax.plot([run.global_step], [final], color=color, marker="*", markersize=12, linestyle="none")
                final_only = True
            else:
                missing.append(run.name)
        if final_only:
            ax.text(0.02, 0.94, "★ evaluated only at the end", transform=ax.transAxes, fontsize=8, color="gray")
        _finish(ax, title, "optimizer step", ylabel, missing)
    if with_landscape:
        ax, missing = axes[3], []
        for run, color, curve in zip(runs, colors, curves):
            if curve is None:
                missing.append(run.name)
            else:
                ax.plot(run.landscape.coordinates, curve, color=color, marker="o", markersize=3)
        ax.axvline(0.0, color="gray", linestyle=":")
        ax.annotate("trained weights", (0.0, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="gray", fontsize=8)
        _finish(ax, "Loss landscape at the final evaluation (Li et al. 2018)",
                "α: step along a filter-normalized random direction", "evaluation loss at w + α·d", missing)
    for run, color in zip(runs, colors):
        lines.append(axes[0].plot([], [], color=color, marker="o", markersize=3, label=run.label)[0])
    fig.legend(handles=lines, loc="outside lower center", ncols=min(len(runs), 3), title="runs")
    fig.suptitle(f"hf-msam compare: {len(runs)} run(s)", fontsize=14)
    fig.savefig(path, dpi=110)
    return fig


def _finish(ax: Any, title: str, xlabel: str, ylabel: str, missing: list[str]) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if missing:
        ax.text(0.02, 0.02, "not in the logs of: " + ", ".join(missing), transform=ax.transAxes, fontsize=8, color="gray")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-msam compare",
        description="Compare training runs (Trainer output directories): writes OUTPUT.md, a table with one row a "
        "run (mSAM settings, final evaluation metrics, flatness numbers, train time), and OUTPUT.png (training "
        "loss, an evaluation metric and the mSAM sharpness against steps, and the loss landscapes).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir")
    parser.add_argument("--output", default="report", help="where to write: OUTPUT.md and OUTPUT.png (default: report)")
    parser.add_argument("--metric", default="eval_loss", help="the evaluation metric to plot (default: eval_loss)")
    argv = list(sys.argv[1:] if argv is None else argv)
    from .launcher import reject_msam_flags

    status = reject_msam_flags(
        argv, "hf-msam compare", "it reads each run's settings from its training_args.bin. Give the --msam_* flags to "
        "the training runs (e.g. `hf-msam run SCRIPT.py --msam_rho ...`), then compare their output directories."
    )
    if status is not None:
        return status
    args = parser.parse_args(argv)

    runs, skipped = [], []
    names = [Path(d).resolve().name for d in args.runs]
    for directory, name in zip(args.runs, names):
        try:
            runs.append(load_run(directory, name=name if names.count(name) == 1 else directory))
        except RunError as error:
            skipped.append((directory, str(error)))
            print(f"hf-msam compare: skipping {directory}: {error}", file=sys.stderr)
    if not runs:
        print("hf-msam compare: no run could be read; nothing written.", file=sys.stderr)
        return 1

    output = Path(args.output)
    if output.suffix in (".md", ".png"):
        output = output.with_suffix("")
    output.parent.mkdir(parents=True, exist_ok=True)
    markdown, figure = Path(f"{output}.md"), Path(f"{output}.png")
    plot_runs(runs, figure, args.metric)
    write_report(runs, skipped, markdown, figure=figure.name)
    print(f"hf-msam compare: wrote {markdown} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
