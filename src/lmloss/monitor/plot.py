"""PNG plots of a run, and the ``lmloss plot RUN_DIR`` command.

``plot_run(run_dir)`` reads ``RUN_DIR/metrics.jsonl`` (the format is described in
``lmloss.monitor.sinks``) and writes, into ``RUN_DIR/plots/``, one PNG per panel that
has data, plus ``overview.png`` with every panel:

==================  ============================================================
``loss.png``        train loss (raw, faint; debiased EMA, bold), eval loss
                    (markers), every event marked (spikes at their value, NaN at
                    the top edge, divergence/plateau/overfitting/converged as
                    vertical lines)
``perplexity.png``  ``exp`` of the smoothed train loss and of the eval loss (log scale)
``lr.png``          learning rate
``terms.png``       per-term losses of a composite loss (train smoothed, eval markers)
``grad_norm.png``   gradient norm with its spikes
``throughput.png``  target tokens per second
``accuracy.png``    token accuracy, train and eval
==================  ============================================================

Each file is written to a temporary name in the same folder and moved into place
with ``os.replace``: a reader never sees half a PNG. matplotlib is imported only
here, and only through ``matplotlib.figure.Figure`` with the Agg renderer, so no
display and no global pyplot state are involved.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmloss._files import atomic_write, check_writable_dir
from lmloss.monitor.events import Event
from lmloss.monitor.sinks import METRICS_FILE, RunLog, read_jsonl

__all__ = ["PlotResult", "configure", "plot_log", "plot_run", "run"]

# Okabe-Ito: distinguishable with every common colour-vision deficiency.
BLUE, ORANGE, GREEN, VERMILION, PURPLE, SKY, YELLOW, GREY = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#666666",
)
TERM_COLORS = (BLUE, ORANGE, GREEN, PURPLE, SKY, VERMILION, YELLOW, GREY)
EVENT_STYLE: dict[str, dict[str, Any]] = {
    "spike": {"color": VERMILION, "marker": "^"},
    "nan": {"color": "#C00000", "marker": "X"},
    "divergence": {"color": "#C00000", "linestyle": (0, (5, 2))},
    "overfitting": {"color": PURPLE, "linestyle": (0, (4, 1.5, 1, 1.5))},
    "plateau": {"color": GREY, "linestyle": (0, (1.5, 1.5))},
    "converged": {"color": GREEN, "linestyle": "-"},
}
# The series every panel draws alike: a metric looks the same in the loss, perplexity
# and accuracy panels.
_TRAIN_RAW: dict[str, Any] = {"color": BLUE, "alpha": 0.28, "linewidth": 0.9, "label": "train (raw)"}
_TRAIN_SMOOTHED: dict[str, Any] = {"color": BLUE, "linewidth": 2.0, "label": "train (smoothed)"}
_EVAL: dict[str, Any] = {"color": ORANGE, "linewidth": 1.6, "marker": "o", "markersize": 4, "label": "eval"}
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.labelcolor": "#222222",
    "axes.edgecolor": "#999999",
    "axes.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#E8E8E8",
    "grid.linewidth": 0.8,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "legend.fontsize": 9,
    "lines.solid_capstyle": "round",
    "savefig.dpi": 150,
    "savefig.facecolor": "white",
}
FIGSIZE = (8.0, 4.5)  # 1200 x 675 pixels at 150 dpi
DEFAULT_SMOOTHING = 0.9


@dataclass(frozen=True)
class PlotResult:
    """What ``plot_run`` did: the PNGs written, and the log it read (with skipped lines)."""

    paths: list[Path]
    log: RunLog
    source: Path


# --- data ----------------------------------------------------------------------------------


@dataclass
class RunData:
    """Series by scalar name, deduplicated (last record of a (split, step) wins) and sorted."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    name: str = ""

    def get(self, key: str) -> tuple[list[int], list[float]]:
        return self.series.get(key, ([], []))

    def has(self, key: str) -> bool:
        return bool(self.series.get(key, ([], []))[0])

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.series if k.startswith(prefix))


def run_data(log: RunLog, *, smoothing: float | None = None, name: str = "") -> RunData:
    """Turn a ``RunLog`` into plottable series; ``smoothing`` recomputes the train EMA."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for record in log.records:  # a resumed run re-logs steps: the later record wins
        latest[(record["split"], record["step"])] = record
    data = RunData(name=name)
    for _, record in sorted(latest.items(), key=lambda item: (item[0][1], item[0][0])):
        for key, value in record.items():
            if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = data.series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    if data.has("train/loss") and (smoothing is not None or not data.has("train/loss_smoothed")):
        steps, losses = data.get("train/loss")
        data.series["train/loss_smoothed"] = (steps, ema(losses, DEFAULT_SMOOTHING if smoothing is None else smoothing))
    unique = {(e.step, e.kind, e.metric): e for e in log.events}
    data.events = sorted(unique.values(), key=lambda e: e.step)
    return data


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased EMA (TensorBoard/W&B): ``last = last*w + y; n = n*w + 1; out = last/n``.

    Non-finite values are skipped (the previous output is repeated).
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    last, n, out = 0.0, 0.0, []
    for y in values:
        if math.isfinite(y):
            last, n = last * weight + y, n * weight + 1.0
        out.append(last / n if n else math.nan)
    return out


# --- panels --------------------------------------------------------------------------------

_Panel = Callable[[Any, RunData], bool]


def _panel(
    title: str, ylabel: str, *, shown: Callable[[RunData], bool], legend: bool = True
) -> Callable[[Callable[[Any, RunData], None]], _Panel]:
    """Make a function that draws into ``ax`` a panel: ``panel(ax, data)`` draws nothing
    and returns ``False`` unless ``shown(data)``; else it draws, gives the axes their
    title, labels and legend, and returns ``True``."""

    def make(draw: Callable[[Any, RunData], None]) -> _Panel:
        def panel(ax: Any, data: RunData) -> bool:
            if not shown(data):
                return False
            draw(ax, data)
            _finish(ax, title, ylabel, data, legend=legend)
            return True

        return panel

    return make


def _any_of(*keys: str) -> Callable[[RunData], bool]:
    """``shown`` of a panel that has data when any of ``keys`` has."""
    return lambda data: any(data.has(key) for key in keys)


def _plot_eval(ax: Any, data: RunData, key: str, *, scale: float = 1.0) -> None:
    """The evaluation series ``key`` (times ``scale``) as markers, if there is one."""
    if data.has(key):
        steps, values = data.get(key)
        ax.plot(steps, [scale * v for v in values], **_EVAL)


@_panel("Loss", "loss (nats / token)", shown=_any_of("train/loss", "eval/loss"))
def _panel_loss(ax: Any, data: RunData) -> None:
    if data.has("train/loss"):
        steps, raw = data.get("train/loss")
        # Few points: mark each one, or a value between two NaNs would not show at all.
        ax.plot(steps, raw, **_TRAIN_RAW, marker="o" if len(steps) <= 60 else None, markersize=3)
        ax.plot(*data.get("train/loss_smoothed"), **_TRAIN_SMOOTHED)
    _plot_eval(ax, data, "eval/loss")
    _auto_log_scale(ax, data.get("train/loss")[1] + data.get("eval/loss")[1])
    _mark_events(ax, data, "train/loss")


@_panel("Perplexity", "perplexity = exp(loss)", shown=_any_of("train/loss_smoothed", "eval/ppl"))
def _panel_perplexity(ax: Any, data: RunData) -> None:
    if data.has("train/loss_smoothed"):
        steps, smoothed = data.get("train/loss_smoothed")
        ax.plot(steps, [_exp(x) for x in smoothed], **_TRAIN_SMOOTHED)
    _plot_eval(ax, data, "eval/ppl")
    _log_scale(ax)


@_panel("Learning rate", "learning rate", shown=_any_of("train/lr"), legend=False)
def _panel_lr(ax: Any, data: RunData) -> None:
    ax.plot(*data.get("train/lr"), color=GREEN, linewidth=1.8, label="learning rate")
    from matplotlib.ticker import FuncFormatter

    # "3e-04"-style ticks: an offset text ("1e-4" above the axis) would collide with the title.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.set_ylim(bottom=0)


def _term_names(data: RunData) -> list[str]:
    return sorted({k.split("/", 2)[2] for k in data.keys("train/term/") + data.keys("eval/term/")})


@_panel("Loss terms", "loss (nats / token)", shown=lambda data: bool(_term_names(data)))
def _panel_terms(ax: Any, data: RunData) -> None:
    names = _term_names(data)
    values: list[float] = []
    for name, color in zip(names, _cycle(TERM_COLORS, len(names))):
        if data.has(f"train/term/{name}"):
            steps, raw = data.get(f"train/term/{name}")
            ax.plot(steps, raw, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(raw, DEFAULT_SMOOTHING), color=color, linewidth=1.8, label=f"{name} (train)")
            values += raw
        if data.has(f"eval/term/{name}"):
            ax.plot(
                *data.get(f"eval/term/{name}"),
                color=color,
                linestyle="none",
                marker="o",
                markersize=4,
                label=f"{name} (eval)",
            )
            values += data.get(f"eval/term/{name}")[1]
    _auto_log_scale(ax, values)


@_panel("Gradient norm", "gradient norm (L2, before clipping)", shown=_any_of("train/grad_norm"))
def _panel_grad_norm(ax: Any, data: RunData) -> None:
    ax.plot(*data.get("train/grad_norm"), color=PURPLE, linewidth=1.0, label="gradient norm")
    _auto_log_scale(ax, data.get("train/grad_norm")[1])
    _mark_events(ax, data, "train/grad_norm", lines=False)


@_panel("Throughput", "tokens / s", shown=_any_of("throughput/tokens_per_s"), legend=False)
def _panel_throughput(ax: Any, data: RunData) -> None:
    from matplotlib.ticker import EngFormatter

    ax.plot(*data.get("throughput/tokens_per_s"), color=SKY, linewidth=1.4, label="tokens / s")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylim(bottom=0)


@_panel("Token accuracy", "next-token accuracy (%)", shown=_any_of("train/accuracy", "eval/accuracy"))
def _panel_accuracy(ax: Any, data: RunData) -> None:
    if data.has("train/accuracy"):
        steps, acc = data.get("train/accuracy")
        ax.plot(steps, [100 * a for a in acc], **_TRAIN_RAW)
        ax.plot(steps, [100 * a for a in ema(acc, DEFAULT_SMOOTHING)], **_TRAIN_SMOOTHED)
    _plot_eval(ax, data, "eval/accuracy", scale=100.0)


PANELS: dict[str, _Panel] = {
    "loss": _panel_loss,
    "perplexity": _panel_perplexity,
    "lr": _panel_lr,
    "terms": _panel_terms,
    "grad_norm": _panel_grad_norm,
    "throughput": _panel_throughput,
    "accuracy": _panel_accuracy,
}


def _mark_events(ax: Any, data: RunData, metric: str, *, lines: bool = True) -> None:
    """Spikes of ``metric`` as markers at their value; with ``lines``, NaNs at the top
    edge and the other kinds as labelled vertical lines."""
    labelled: set[str] = set()

    def label(kind: str) -> str:
        first = kind not in labelled
        labelled.add(kind)
        return kind if first else "_nolegend_"

    at_step: dict[int, list[str]] = {}
    for event in data.events:
        style = EVENT_STYLE[event.kind]
        if event.kind == "spike" and event.metric == metric:
            ax.plot(
                [event.step],
                [event.value],
                linestyle="none",
                marker=style["marker"],
                markersize=8,
                color=style["color"],
                markeredgecolor="white",
                markeredgewidth=0.8,
                zorder=5,
                label=label("spike"),
            )
        elif event.kind == "nan" and lines:
            ax.plot(
                [event.step],
                [0.97],
                transform=ax.get_xaxis_transform(),
                linestyle="none",
                zorder=5,
                marker=style["marker"],
                markersize=8,
                color=style["color"],
                label=label("NaN / inf"),
            )
        elif event.kind not in ("spike", "nan") and lines:
            ax.axvline(
                event.step,
                color=style["color"],
                linestyle=style["linestyle"],
                linewidth=1.3,
                alpha=0.9,
                zorder=1,
                label=label(event.kind),
            )
            at_step.setdefault(event.step, []).append(event.kind)
    _label_lines(ax, at_step)


def _label_lines(ax: Any, at_step: dict[int, list[str]]) -> None:
    """Name the vertical lines at their top (several kinds at one step share a label)."""
    if len(at_step) > 12:  # too many to read: the legend has to do
        return
    for step, kinds in at_step.items():
        ax.text(
            step,
            0.985,
            " + ".join(dict.fromkeys(kinds)),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=7.5,
            color=EVENT_STYLE[kinds[0]]["color"],
            zorder=6,
        )


def _finish(ax: Any, title: str, ylabel: str, data: RunData, *, legend: bool = True) -> None:
    ax.set_title(title, loc="left")
    if data.name:
        ax.set_title(data.name, loc="right", fontsize=9, color=GREY, fontweight="normal")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))  # no "step 2.5"
    ax.set_ylabel(ylabel)
    ax.margins(x=0.01)
    handles = ax.get_legend_handles_labels()[0]
    if legend and len(handles) > 4:  # curves and event kinds: beside the plot, not over the data
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif legend and handles:
        ax.legend(loc="best")


def _auto_log_scale(ax: Any, values: Iterable[float]) -> None:
    """Log scale when positive values span more than 1.5 decades (e.g. 6 -> 0.01)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        _log_scale(ax)


def _log_scale(ax: Any) -> None:
    """Log scale with plain tick labels ("20", "0.01"), minor ticks labelled when the span is short."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))


def _cycle(colors: Sequence[str], n: int) -> list[str]:
    return [colors[i % len(colors)] for i in range(n)]


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0)) if math.isfinite(x) else math.nan


# --- files ---------------------------------------------------------------------------------


def plot_log(
    log: RunLog, out_dir: str | os.PathLike[str], *, smoothing: float | None = None, name: str = ""
) -> list[Path]:
    """Write the PNGs of ``log`` into ``out_dir``; return their paths (panels without data are skipped)."""
    matplotlib = _matplotlib()
    from matplotlib.figure import Figure

    data = run_data(log, smoothing=smoothing, name=name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    drawn: list[str] = []
    with matplotlib.rc_context(STYLE):
        for panel, draw in PANELS.items():
            figure = Figure(figsize=FIGSIZE, layout="constrained")
            if draw(figure.add_subplot(), data):
                written.append(_save(figure, out / f"{panel}.png"))
                drawn.append(panel)
        if drawn:
            written.append(_save(_overview(Figure, data, drawn), out / "overview.png"))
    return written


def _overview(figure_type: Any, data: RunData, panels: list[str]) -> Any:
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = figure_type(figsize=(6.4 * columns, 3.6 * rows), layout="constrained")
    if data.name:
        figure.suptitle(data.name, x=0.01, ha="left", fontsize=13, fontweight="bold")
    panel_data = replace(data, name="")  # the run's name once, above all panels
    for index, panel in enumerate(panels, start=1):
        PANELS[panel](figure.add_subplot(rows, columns, index), panel_data)
    return figure


def _save(figure: Any, path: Path) -> Path:
    """Render to a temporary file next to ``path``, then move it into place atomically."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def _matplotlib() -> Any:
    try:
        import matplotlib as mpl
    except ImportError as error:
        raise ImportError("lmloss plots need matplotlib: pip install 'lmloss[plot]'") from error
    return mpl


def plot_run(
    run_dir: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None, smoothing: float | None = None
) -> PlotResult:
    """Read ``RUN_DIR/metrics.jsonl`` (or a ``.jsonl`` file) and write ``RUN_DIR/plots/*.png``.

    Args:
        run_dir: the run directory, or the JSONL file itself.
        out_dir: where to write (default ``RUN_DIR/plots``).
        smoothing: EMA weight in ``[0, 1)`` to re-smooth the train loss with
            (default: the smoothed values the monitor logged).

    Raises:
        FileNotFoundError: no metrics file there.
    """
    source = Path(run_dir)
    if source.is_dir():
        source = source / METRICS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no metrics file at {source}: a run directory holds {METRICS_FILE}")
    log = read_jsonl(source)
    target = Path(out_dir) if out_dir is not None else source.parent / "plots"
    paths = plot_log(log, target, smoothing=smoothing, name=source.parent.name)
    return PlotResult(paths, log, source)


# --- command line --------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lmloss plot``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"run directory holding {METRICS_FILE} (or the file)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    parser.add_argument(
        "--smoothing",
        metavar="W",
        type=float,
        default=None,
        help="re-smooth the train loss with this EMA weight in [0, 1) (default: as logged)",
    )


def run(args: argparse.Namespace) -> int:
    """``lmloss plot``: 0 when plots were written, 1 when there was nothing to plot."""
    if args.smoothing is not None and not 0.0 <= args.smoothing < 1.0:
        print(f"lmloss plot: --smoothing must be in [0, 1), got {args.smoothing}", file=sys.stderr)
        return 2
    if args.out is not None:
        problem = _unwritable(Path(args.out))
        if problem:
            print(f"lmloss plot: error: {problem}", file=sys.stderr)
            return 2
    try:
        result = plot_run(args.run_dir, out_dir=args.out, smoothing=args.smoothing)
    except (FileNotFoundError, ImportError) as error:
        print(f"lmloss plot: {error}", file=sys.stderr)
        return 1
    for skipped in result.log.skipped:
        print(f"lmloss plot: {skipped.describe(result.source)}", file=sys.stderr)
    log = result.log
    print(
        f"read {len(log.records)} records and {len(log.events)} events from {result.source}"
        + (f" ({len(log.skipped)} line(s) skipped)" if log.skipped else "")
    )
    if not result.paths:
        print("lmloss plot: nothing to plot (no loss record)", file=sys.stderr)
        return 1
    for path in result.paths:
        print(f"wrote {path}")
    return 0


def _unwritable(out: Path) -> str | None:
    """Why PNGs cannot be written into ``out`` (made if missing), or ``None``: checked
    before anything is drawn, so a read-only --out is one line, not a traceback."""
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is a file, not a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_writable_dir(out, "--out")
    except OSError as err:
        return f"--out {str(out)!r} cannot be created: {err.strerror or err}"
    except ValueError as err:
        return str(err)
    return None
