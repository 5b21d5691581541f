"""One evaluation's report: a self-contained HTML page (every figure and image embedded as a
``data:`` URI, no script, no external URL, readable offline) with the summary table, the per-class
table (AP, AP50, boxes, true/false positives and misses at the stated threshold, F1-best threshold),
the per-class AP figure, the confusion matrix, precision / recall / F1 vs score threshold and the
worst validation images; the figures are also written as PNG files beside it.

File names are the caller's (:class:`ReportPaths`; a run folder's come from :mod:`ssd300.run_folder`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ssd300.coco_eval import STAT_NAMES, CocoMetrics
from ssd300.diagnostics import IOU_THRESHOLD, Diagnostics, ImageErrors
from ssd300.files import PathLike, atomic_write
from ssd300.plots import plot_confusion_matrix, plot_evaluation, plot_threshold_curves

log = logging.getLogger(__name__)

WORST_IMAGE_WIDTH = 480  # the worst images are embedded this wide (JPEG), to keep the page small


@dataclass(frozen=True)
class ReportPaths:
    """Where one evaluation's report and figures go."""

    html: Path
    evaluation_plot: Path     # per-class AP bars and PR curves
    confusion_plot: Path
    thresholds_plot: Path

    @classmethod
    def in_folder(cls, folder: PathLike) -> "ReportPaths":
        """Plain names in ``folder`` (a run folder names them per epoch instead)."""
        folder = Path(folder)
        return cls(folder / "report.html", folder / "per_class_ap.png", folder / "confusion_matrix.png",
                   folder / "thresholds.png")


def write_report(paths: ReportPaths, metrics: CocoMetrics, diagnostics: Diagnostics, names: Mapping[int, str], *,
                 title: str, image_paths: Optional[Mapping[int, Path]] = None) -> Path:
    """Write the figures, then the page embedding them; returns the page's path.

    ``image_paths`` maps image ids to their files, for the worst images (an image that cannot be
    read is named in the page instead)."""
    plot_evaluation(metrics, names, paths.evaluation_plot, title=title)
    plot_confusion_matrix(diagnostics.confusion, names, paths.confusion_plot, title=title)
    plot_threshold_curves(diagnostics.curves, names, paths.thresholds_plot, title=title)
    figures = [("Per-class AP and precision-recall at IoU 0.5", paths.evaluation_plot),
               ("Confusion matrix", paths.confusion_plot),
               ("Precision, recall and F1 vs score threshold", paths.thresholds_plot)]
    worst = [_worst_image_html(item, names, (image_paths or {}).get(item.image_id)) for item in diagnostics.worst]
    page = _page(title, metrics, diagnostics, names, figures, worst)
    with atomic_write(paths.html) as handle:
        handle.write(page.encode("utf-8"))
    return paths.html


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _worst_image_html(item: ImageErrors, names: Mapping[int, str], path: Optional[Path]) -> str:
    from PIL import Image

    from ssd300.data.images import apply_orientation, exif_orientation, open_image, to_rgb
    from ssd300.visualize import draw_errors

    caption = (f"image {item.image_id}{f' ({html.escape(path.name)})' if path else ''}: "
               f"{len(item.false_positives)} false positives, {len(item.misses)} misses, "
               f"{len(item.true_positives)} true positives")
    if path is None:
        return f'<figure class="worst missing"><figcaption>{caption}: no image file known</figcaption></figure>'
    try:
        with open_image(path) as raw:
            picture = to_rgb(apply_orientation(raw, exif_orientation(raw)))
            picture.load()
    except (OSError, ValueError) as exc:
        log.warning("report: cannot draw image %s (%s)", path, exc)
        return f'<figure class="worst missing"><figcaption>{caption}: cannot read it</figcaption></figure>'
    # drawn at the page's width (boxes scaled), so captions stay sharp on small and large images alike
    scale = WORST_IMAGE_WIDTH / picture.width
    picture = picture.resize((WORST_IMAGE_WIDTH, max(1, round(picture.height * scale))), Image.Resampling.LANCZOS)
    drawn = Image.fromarray(draw_errors(picture, item.scaled(scale), names).permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    drawn.save(buffer, format="JPEG", quality=85)
    source = _data_uri(buffer.getvalue(), "image/jpeg")
    return (f'<figure class="worst"><img alt="image {item.image_id}" src="{source}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _cell(value: float) -> str:
    return "&ndash;" if value < 0 else f"{value:.3f}"


def _page(title: str, metrics: CocoMetrics, diagnostics: Diagnostics, names: Mapping[int, str],
          figures: list[tuple[str, Path]], worst: list[str]) -> str:
    from ssd300.visualize import ERROR_COLORS

    esc = html.escape
    threshold = diagnostics.score_threshold
    summary_rows = "".join(f"<tr><th>{esc(name)}</th><td>{_cell(value)}</td></tr>"
                           for name, value in zip(STAT_NAMES, metrics.stats))
    summary_rows += (f"<tr><th>images</th><td>{metrics.num_images}</td></tr>"
                     f"<tr><th>detections</th><td>{metrics.num_detections}</td></tr>"
                     f"<tr><th>evaluator</th><td>{esc(metrics.backend)}</td></tr>")
    counts = diagnostics.confusion.counts
    curves = diagnostics.curves
    class_rows = []
    for k, cid in enumerate(curves.category_ids):
        ap = metrics.per_class.get(cid, {"AP": -1.0, "AP50": -1.0})
        tp = int(counts[k, k])
        fp = int(counts[:, k].sum()) - tp
        missed = int(counts[k, :].sum()) - tp
        best = curves.best_threshold[k]
        best_cells = (f"<td>{best:.3f}</td><td>{curves.best_f1[k]:.3f}</td><td>{curves.best_precision[k]:.3f}</td>"
                      f"<td>{curves.best_recall[k]:.3f}</td>") if best is not None else "<td>&ndash;</td>" * 4
        class_rows.append(f"<tr><th>{esc(names.get(cid, str(cid)))}</th><td>{cid}</td><td>{curves.num_boxes[k]}</td>"
                          f"<td>{_cell(ap['AP'])}</td><td>{_cell(ap['AP50'])}</td><td>{tp}</td><td>{fp}</td>"
                          f"<td>{missed}</td>{best_cells}</tr>")
    figure_html = "".join(
        f'<figure><img alt="{esc(caption)}" src="{_data_uri(path.read_bytes(), "image/png")}">'
        f"<figcaption>{esc(caption)} ({esc(path.name)})</figcaption></figure>" for caption, path in figures)
    legend = "".join(f'<span class="key"><span class="swatch" style="background:rgb{color}"></span>{esc(kind)}</span>'
                     for kind, color in ERROR_COLORS.items())
    worst_html = "".join(worst) if worst else "<p>No image has a false positive or a miss at this threshold.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)} &ndash; evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ text-align: left; background: #f4f4f4; }}
figure {{ margin: 0 0 1.5em 0; }}
figure img {{ max-width: 100%; border: 1px solid #ddd; }}
.worst-grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.worst {{ width: 480px; }}
.worst img {{ width: 480px; }}
.key {{ margin-right: 1.5em; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; margin-right: 0.4em; vertical-align: middle; }}
</style></head><body>
<h1>Evaluation report: {esc(title)}</h1>
<h2>Summary (COCO bbox)</h2>
<table>{summary_rows}</table>
<h2>Per class</h2>
<p>True positives, false positives and misses at IoU {IOU_THRESHOLD} and score &ge; {threshold:.3f}
({esc(diagnostics.threshold_origin)}), from COCO's matching (100 detections per image and
class, crowd boxes ignored). F1-best: each class's own best threshold and its F1, precision and recall;
<code>ssd300 detect --score-threshold best</code> applies these thresholds.</p>
<table><tr><th>class</th><th>id</th><th>boxes</th><th>AP</th><th>AP50</th><th>TP</th><th>FP</th><th>misses</th>
<th>F1-best threshold</th><th>F1</th><th>precision</th><th>recall</th></tr>
{"".join(class_rows)}</table>
<h2>Figures</h2>
{figure_html}
<h2>Worst images</h2>
<p>The images with the most false positives + misses at score &ge; {threshold:.3f}. {legend}</p>
<div class="worst-grid">{worst_html}</div>
</body></html>
"""
