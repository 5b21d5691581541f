"""Run figures: the loss and mAP curves (training loss, validation mAP) and one figure per evaluation
(per-class AP bars and precision-recall curves at IoU 0.5).

Drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``), so no
display is needed and the process-wide pyplot backend is left alone. Files are written
atomically (:func:`ssd300.files.atomic_write`), like every other run output; their file names
are :mod:`ssd300.run_folder`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ssd300.coco_eval import RECALL_POINTS, CocoMetrics
from ssd300.files import atomic_write


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


def plot_evaluation(metrics: CocoMetrics, names: Mapping[int, str], path: str | os.PathLike[str],
                    title: str = "") -> Path:
    """Per-class AP and AP50 bars (classes without ground truth left out) and each class's
    precision-recall curve at IoU 0.5 (pycocotools' interpolated precision at 101 recall points)."""
    from matplotlib.figure import Figure

    classes = [cid for cid, v in metrics.per_class.items() if v["AP"] >= 0]
    labels = [names.get(cid, str(cid)) for cid in classes]
    fig = Figure(figsize=(max(11.0, 4 + 0.3 * len(classes)), 4.5))
    ax_bars, ax_pr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, len(classes) / 12), 1]})
    positions = range(len(classes))
    ax_bars.bar([p - 0.2 for p in positions], [metrics.per_class[c]["AP50"] for c in classes], width=0.4,
                label="AP50")
    ax_bars.bar([p + 0.2 for p in positions], [metrics.per_class[c]["AP"] for c in classes], width=0.4,
                label="AP@[.5:.95]")
    ax_bars.set_xticks(list(positions))
    many = len(classes) > 8
    ax_bars.set_xticklabels(labels, rotation=60 if many else 0, ha="right" if many else "center",
                            fontsize=8 if len(classes) > 20 else 10)
    ax_bars.set_ylim(0, 1)
    ax_bars.set(title=f"per-class AP ({title})" if title else "per-class AP", ylabel="AP")
    ax_bars.legend()
    recall = [i / (RECALL_POINTS - 1) for i in range(RECALL_POINTS)]
    for cid, curve in metrics.pr_curves.items():
        ax_pr.plot(recall, curve, linewidth=1.2,
                   label=f"{names.get(cid, str(cid))} ({metrics.per_class.get(cid, {}).get('AP50', 0):.2f})")
    ax_pr.set(title="precision-recall at IoU 0.5", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    if 0 < len(metrics.pr_curves) <= 20:
        ax_pr.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, Path(path))
