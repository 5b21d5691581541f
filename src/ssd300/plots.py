"""Run figures: the loss and mAP curves (training loss, validation mAP) and one figure per evaluation
(per-class AP bars and precision-recall curves at IoU 0.5), and the evaluation's diagnostics
(:mod:`ssd300.diagnostics`): the confusion matrix and precision / recall / F1 vs score threshold.

Drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``), so no
display is needed and the process-wide pyplot backend is left alone. Files are written
atomically (:func:`ssd300.files.atomic_write`), like every other run output; their file names
are :mod:`ssd300.run_folder`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import unicodedata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ssd300.coco_eval import RECALL_POINTS, CocoMetrics
from ssd300.files import atomic_write
from ssd300.fonts import FontChoice, choose_fonts

if TYPE_CHECKING:
    from ssd300.diagnostics import ConfusionMatrix, ThresholdCurves


def _save(fig: Any, path: Path) -> Path:
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path


def plot_curves(loss_history: Sequence[tuple[int, float]], evaluations: Sequence[Mapping[str, Any]],
                path: str | os.PathLike[str]) -> Path:
    """Training loss per iteration (with a running mean) and AP / AP50 per evaluated epoch, both
    axes numbered from 0 as everywhere else (``loss_history``'s iterations, the records' ``epoch``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_map = fig.subplots(1, 2)
    if loss_history:
        steps, losses = zip(*loss_history)
        ax_loss.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 30)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax_loss.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss")
    if evaluations:
        epochs = [e["epoch"] for e in evaluations]
        ax_map.plot(epochs, [e["AP50"] for e in evaluations], "o-", label="AP50")
        ax_map.plot(epochs, [e["AP"] for e in evaluations], "s-", label="AP@[.5:.95]")
        ax_map.set_ylim(0, 1)
        ax_map.legend()
    ax_map.set(title="validation mAP (COCO)", xlabel="epoch", ylabel="mAP")
    fig.tight_layout()
    return _save(fig, Path(path))


LEGEND_MAX = 20  # PR curves named in the legend (best AP50 first); the rest are counted as "+N more"


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def short_label(name: str, width: int = 18, lines: int = 2) -> str:
    """``name`` wrapped at ``width`` columns (CJK characters count 2) on at most ``lines`` lines,
    the rest replaced by "…": a long class name stays readable under a bar."""
    rows: list[str] = []
    row = ""
    for word in name.split() or [""]:
        while word:
            room = width - _display_width(row) - (1 if row else 0)
            if _display_width(word) <= room:
                row, word = f"{row} {word}" if row else word, ""
            elif row:
                rows.append(row)
                row = ""
            else:  # a word longer than a line: cut it
                cut = next(i for i in range(len(word), 0, -1) if _display_width(word[:i]) <= width or i == 1)
                rows.append(word[:cut])
                word = word[cut:]
    rows.append(row)
    rows = [r for r in rows if r] or [""]
    if len(rows) > lines:
        last = rows[lines - 1]
        while last and _display_width(last) > width - 1:
            last = last[:-1]
        rows = rows[:lines - 1] + [last + "\u2026"]
    return "\n".join(rows)


@contextlib.contextmanager
def _class_name_fonts(choice: FontChoice) -> Iterator[None]:
    """Matplotlib draws with the chosen fonts (glyph by glyph fallback) without touching the
    process's rcParams, and its missing-glyph warnings never reach the console (``choice.clean``
    already replaced those characters; this is the safety net)."""
    import matplotlib

    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)
    try:
        with matplotlib.rc_context({"font.family": list(choice.families)}), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
            warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support")
            yield
    finally:
        font_log.setLevel(level)


def plot_evaluation(metrics: CocoMetrics, names: Mapping[int, str], path: str | os.PathLike[str],
                    title: str = "") -> Path:
    """Per-class AP and AP50 bars (classes without ground truth left out) and each class's
    precision-recall curve at IoU 0.5 (pycocotools' interpolated precision at 101 recall points)."""
    with _class_name_fonts(_fonts_for(metrics, names, title)):
        return _save(evaluation_figure(metrics, names, title), Path(path))


def _fonts_for(metrics: CocoMetrics, names: Mapping[int, str], title: str) -> FontChoice:
    return choose_fonts([title, *(names.get(cid, str(cid)) for cid in {*metrics.per_class, *metrics.pr_curves})])


def evaluation_figure(metrics: CocoMetrics, names: Mapping[int, str], title: str = "") -> Any:
    """The :func:`plot_evaluation` figure (a ``matplotlib.figure.Figure``), not saved; class names
    drawn with fonts that have their characters (:mod:`ssd300.fonts`), long ones wrapped."""
    choice = _fonts_for(metrics, names, title)
    classes = [cid for cid, v in metrics.per_class.items() if v["AP"] >= 0]
    curves = [cid for cid in metrics.pr_curves if metrics.per_class.get(cid, {}).get("AP", 0) >= 0]
    names = {cid: choice.clean(names.get(cid, str(cid))) for cid in {*classes, *curves}}
    title = choice.clean(title)
    with _class_name_fonts(choice):
        return _evaluation_figure(metrics, classes, curves, names, title)


def _evaluation_figure(metrics: CocoMetrics, classes: list[int], curves: list[int], names: Mapping[int, str],
                       title: str) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = [short_label(names[cid]) for cid in classes]
    fig = Figure(figsize=(max(11.0, 4 + 0.3 * len(classes)), 4.5))
    ax_bars, ax_pr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, len(classes) / 12), 1]})
    positions = range(len(classes))
    ax_bars.bar([p - 0.2 for p in positions], [metrics.per_class[c]["AP50"] for c in classes], width=0.4,
                label="AP50")
    ax_bars.bar([p + 0.2 for p in positions], [metrics.per_class[c]["AP"] for c in classes], width=0.4,
                label="AP@[.5:.95]")
    ax_bars.set_xticks(list(positions))
    rotate = len(classes) > 8 or max((_display_width(label) for label in labels), default=0) > 12
    ax_bars.set_xticklabels(labels, rotation=60 if rotate else 0, ha="right" if rotate else "center",
                            rotation_mode="anchor", fontsize=8 if len(classes) > 20 else 10)
    ax_bars.set_ylim(0, 1)
    ax_bars.set(title=f"per-class AP ({title})" if title else "per-class AP", ylabel="AP")
    ax_bars.legend()
    recall = [i / (RECALL_POINTS - 1) for i in range(RECALL_POINTS)]
    # Best AP50 first, so the legend (capped at LEGEND_MAX) names the curves that stand out.
    ordered = sorted(curves, key=lambda cid: -metrics.per_class.get(cid, {}).get("AP50", 0))
    lines = [ax_pr.plot(recall, metrics.pr_curves[cid], linewidth=1.2,
                        label=f"{short_label(names[cid], 24, 1)} "
                              f"({metrics.per_class.get(cid, {}).get('AP50', 0):.2f})")[0]
             for cid in ordered]
    ax_pr.set(title="precision-recall at IoU 0.5", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    if lines:
        handles = lines[:LEGEND_MAX]
        if len(lines) > LEGEND_MAX:
            handles.append(Line2D([], [], linestyle="none", label=f"+{len(lines) - LEGEND_MAX} more"))
        ax_pr.legend(handles=handles, fontsize=8 if len(handles) <= 10 else 6, loc="lower left")
    fig.tight_layout()
    return fig


CONFUSION_LABELS_MAX = 40  # classes whose counts are written in the cells (beyond: colour only)


def plot_confusion_matrix(confusion: "ConfusionMatrix", names: Mapping[int, str], path: str | os.PathLike[str],
                          title: str = "") -> Path:
    """The confusion matrix (:mod:`ssd300.diagnostics`): rows the true class, columns the predicted
    one, background last; cells coloured by the share of their row (a class's boxes; the background
    row by its column) and labelled with their counts; IoU and score threshold in the title."""
    labels = [names.get(cid, str(cid)) for cid in confusion.category_ids] + ["background"]
    choice = choose_fonts([title, *labels])
    with _class_name_fonts(choice):
        return _save(_confusion_figure(confusion, [short_label(choice.clean(n), 14, 1) for n in labels],
                                       choice.clean(title)), Path(path))


def _confusion_figure(confusion: "ConfusionMatrix", labels: list[str], title: str) -> Any:
    import numpy as np
    from matplotlib.figure import Figure

    counts = confusion.counts.astype(float)
    k = len(labels)
    shares = np.zeros_like(counts)
    row_sums = counts[:-1].sum(axis=1, keepdims=True)
    shares[:-1] = np.divide(counts[:-1], row_sums, out=np.zeros_like(counts[:-1]), where=row_sums > 0)
    col_sums = counts[:-1].sum(axis=0) + counts[-1]
    shares[-1] = np.divide(counts[-1], col_sums, out=np.zeros(k), where=col_sums > 0)
    size = min(22.0, max(6.0, 0.45 * k + 3))
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's boxes")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8 if k > 15 else 10)
    ax.set_yticklabels(labels, fontsize=8 if k > 15 else 10)
    ax.set(xlabel="predicted", ylabel="true")
    if k <= CONFUSION_LABELS_MAX:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8 if k > 12 else 10,
                            color="white" if shares[i, j] > 0.5 else "black")
    stated = f"IoU 0.5, score >= {confusion.score_threshold:.3f}"
    ax.set_title(f"confusion matrix ({title}; {stated})" if title else f"confusion matrix ({stated})")
    fig.tight_layout()
    return fig


def plot_threshold_curves(curves: "ThresholdCurves", names: Mapping[int, str], path: str | os.PathLike[str],
                          title: str = "") -> Path:
    """Precision, recall and F1 against the score threshold, one line per class (the legend names
    the :data:`LEGEND_MAX` most frequent), each class's F1-best threshold marked on the F1 panel."""
    shown = [k for k, boxes in enumerate(curves.num_boxes) if boxes > 0]
    labels = {k: names.get(curves.category_ids[k], str(curves.category_ids[k])) for k in shown}
    choice = choose_fonts([title, *labels.values()])
    with _class_name_fonts(choice):
        return _save(_threshold_figure(curves, shown, {k: short_label(choice.clean(v), 24, 1)
                                                       for k, v in labels.items()}, choice.clean(title)), Path(path))


def _threshold_figure(curves: "ThresholdCurves", shown: list[int], labels: Mapping[int, str], title: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3)
    ordered = sorted(shown, key=lambda k: -curves.num_boxes[k])
    for name, values, ax in (("precision", curves.precision, axes[0]), ("recall", curves.recall, axes[1]),
                             ("F1", curves.f1, axes[2])):
        for k in ordered:
            line = ax.plot(curves.thresholds, values[k], linewidth=1.2,
                           label=labels[k] if ordered.index(k) < LEGEND_MAX else None)[0]
            best = curves.best_threshold[k]
            if name == "F1" and best is not None:
                ax.plot([best], [curves.best_f1[k]], "o", color=line.get_color(), markersize=5)
        ax.set(title=f"{name} vs score threshold" + (f" ({title})" if title and name == "precision" else ""),
               xlabel="score threshold", ylabel=name, xlim=(0, 1), ylim=(0, 1.02))
    if ordered:
        axes[2].legend(fontsize=8 if len(ordered) <= 10 else 6, loc="upper right",
                       title="dot: F1-best" if len(ordered) < 30 else None)
    fig.tight_layout()
    return fig
