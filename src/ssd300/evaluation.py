"""COCO evaluation of a model over a loader, on every rank, with gathered results; and a training
run's evaluations (:class:`RunEvaluator`: BatchNorm recalibration, metrics, their records, the
diagnostics (:mod:`ssd300.diagnostics`) and the report with its figures (:mod:`ssd300.report`))."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from ssd300.batchnorm import recalibrate_batchnorm
from ssd300.checkpoint import unwrap_model
from ssd300.coco_eval import (
    CocoMetrics,
    detections_to_rows,
    evaluate_results,
    merge_rank_rows,
    rows_to_results,
    write_results_json,
)
from ssd300.data.coco import CocoDetection, skipped_summary
from ssd300.data.layouts import load_ground_truth
from ssd300.data.loaders import build_eval_loader
from ssd300.default_boxes import default_boxes_300
from ssd300.diagnostics import diagnose
from ssd300.distributed import DistributedContext, all_gather_objects, broadcast_object, gather_arrays
from ssd300.errors import Interrupted
from ssd300.labels import LabelMap
from ssd300.logging_utils import RunLogger
from ssd300.plots import plot_evaluation
from ssd300.postprocess import COCO_EVAL, PostprocessConfig, PostProcessor
from ssd300.report import ReportPaths, write_report
from ssd300.run_folder import REPORT_NAME, RunFolder
from ssd300.runtime import Runtime
from ssd300.voc_eval import evaluate_voc, ground_truth_from_coco


class EvaluationInterrupted(Interrupted):
    """``should_stop`` said yes (a signal arrived): the evaluation ended before its last batch."""


@torch.no_grad()
def predict_rows(model: nn.Module, loader: Iterable[Any], postprocessor: PostProcessor, runtime: Runtime,
                 category_ids: tuple[int, ...], channels_last: bool,
                 progress: Optional[Callable[[int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> tuple[list[int], np.ndarray, list[str]]:
    """Run the model over ``loader``; returns this rank's (image ids, result rows, skipped images).

    The model is on ``runtime.device``; ``channels_last`` is the layout it was put in (training
    evaluates the model in its training layout rather than converting it back and forth).
    ``should_stop`` is asked before every batch; yes raises :class:`EvaluationInterrupted`.
    """
    model.eval()
    device = runtime.device
    image_ids: list[int] = []
    chunks: list[np.ndarray] = []
    skipped: list[str] = []
    for batch in loader:
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted("evaluation stopped by a signal", signal.SIGTERM)
        skipped.extend(batch.skipped)
        batch = batch.without_padding()
        if len(batch) == 0:
            continue
        batch = batch.to(device, non_blocking=True, channels_last=channels_last)
        with runtime.autocast():
            locs, logits = model(batch.images)
        detections = postprocessor(locs.float(), logits.float())
        ids = batch.image_ids.tolist()
        chunks.append(detections_to_rows([d.boxes for d in detections], [d.scores for d in detections],
                                         [d.labels for d in detections], ids, batch.image_sizes.cpu(),
                                         category_ids))
        image_ids.extend(ids)
        if progress is not None:
            progress(len(ids))
    rows = np.concatenate(chunks) if chunks else np.zeros((0, 7))
    return image_ids, rows, skipped


def evaluate_model(model: nn.Module, loader: Iterable[Any], coco_gt: Any, label_map: LabelMap, *,
                   ctx: DistributedContext, runtime: Runtime, channels_last: bool,
                   results_path: Optional[Path] = None, postprocess: PostprocessConfig = COCO_EVAL,
                   metric: str = "coco", log: Optional[Callable[[str], None]] = None,
                   progress: Optional[Callable[[int], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None, diagnostics: bool = False) -> CocoMetrics:
    """COCO evaluation over ``loader`` (all ranks take part); every rank returns the same metrics.

    The COCO summary goes to ``log`` before ``results_path`` is written, so a failing write
    never loses the figures. ``should_stop``: see :func:`predict_rows`.

    Post-processing defaults to :data:`~ssd300.postprocess.COCO_EVAL` (NMS IoU 0.5, as the reference's
    evaluation, SPEC §5).
    ``coco_gt`` is only needed on the main rank. ``progress(n)`` is called after each batch of
    ``n`` images (e.g. :meth:`ssd300.logging_utils.Progress.update`). Only the label map's
    categories are scored (a background category of the file is not a class the model missed).
    ``metric``: "coco", or "voc07"/"voc12" (:mod:`ssd300.voc_eval`, same result type).
    ``diagnostics`` (metric "coco"): also ``metrics.diagnostics`` (:func:`ssd300.diagnostics.diagnose`,
    from the same detections and COCO's matching rules).
    """
    postprocessor = PostProcessor(default_boxes_300().to(ctx.device), postprocess)
    image_ids, rows, skipped = predict_rows(unwrap_model(model), loader, postprocessor, runtime,
                                            label_map.category_ids, channels_last, progress=progress,
                                            should_stop=should_stop)
    # Detections travel as arrays to rank 0 only (not pickles to every rank); skips are few and small.
    gathered_ids = gather_arrays(np.asarray(image_ids, dtype=np.int64), ctx.device)
    gathered_rows = gather_arrays(rows, ctx.device)
    gathered = all_gather_objects(skipped)
    metrics: Optional[CocoMetrics] = None
    if ctx.is_main:
        assert gathered_ids is not None and gathered_rows is not None
        ids, merged = merge_rank_rows(zip(gathered_ids, gathered_rows))
        results = rows_to_results(merged)
        all_skipped = [s for g in gathered for s in g]
        if all_skipped and log is not None:
            log(f"evaluation: {skipped_summary(all_skipped)}")
        if metric == "coco":
            metrics = evaluate_results(coco_gt, results, image_ids=ids, category_ids=label_map.category_ids[1:])
        else:
            metrics = evaluate_voc(ground_truth_from_coco(coco_gt), merged, metric, image_ids=ids,
                                   category_ids=label_map.category_ids[1:])
        if diagnostics and metric == "coco":
            metrics.diagnostics = diagnose(coco_gt, merged, ids, label_map.category_ids[1:])
        if log is not None:  # the figures first: a failing results write must not lose them
            log(metrics.summary)
            log(metrics.per_class_table(label_map.names_by_category_id()))
        if results_path is not None:
            write_results_json(results, results_path)
    metrics = broadcast_object(metrics)
    assert metrics is not None
    return metrics


@dataclass
class RunEvaluator:
    """A run's evaluations of its validation set: optional BatchNorm recalibration, the COCO
    metrics (:func:`evaluate_model`), the console line, the log record, and in the run folder
    (``outputs``) the per-class figure and (metric "coco") the diagnostics' figures and report
    (``report_epoch_<n>.html``, ``report.html`` the newest). ``evaluations`` collects one entry per
    evaluation, with the diagnostics' record (per-class F1-best thresholds, confusion counts)."""

    val_set: CocoDetection
    annotations: Path                 # the validation set's annotation source (ground truth, read on rank 0)
    label_map: LabelMap
    runtime: Runtime
    ctx: DistributedContext
    logger: RunLogger
    batch_size: int
    num_workers: int
    channels_last: bool
    eval_backend: str = "auto"
    metric: str = "coco"
    bn_recalibration: int = 0
    results_path: Optional[Path] = None
    outputs: Optional[RunFolder] = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.coco_gt = load_ground_truth(self.annotations, backend=self.eval_backend) if self.ctx.is_main else None

    def loader(self) -> Any:
        return build_eval_loader(self.val_set, self.batch_size, num_workers=self.num_workers, rank=self.ctx.rank,
                                 world_size=self.ctx.world_size)

    def evaluate(self, model: nn.Module, epoch: int, iteration: int, train_loader: Any = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> CocoMetrics:
        """Evaluate ``model`` after ``epoch`` (0-based); ``iteration``: the 0-based number of the last
        training step before it (as the step records'). ``should_stop`` yes ends it at the next batch
        (:class:`EvaluationInterrupted`)."""
        start = time.perf_counter()
        if train_loader is not None and self.bn_recalibration > 0:
            self.recalibrate(model, train_loader)
        loader = self.loader()
        with self.logger.progress_bar(len(loader.sampler), f"evaluation after epoch {epoch}") as bar:
            metrics = evaluate_model(model, loader, self.coco_gt, self.label_map, ctx=self.ctx, runtime=self.runtime,
                                     channels_last=self.channels_last, results_path=self.results_path,
                                     metric=self.metric, log=self.logger.info, progress=bar.update,
                                     should_stop=should_stop, diagnostics=self.outputs is not None)
        self.record(epoch, iteration, metrics, time.perf_counter() - start)
        return metrics

    def record(self, epoch: int, iteration: int, metrics: CocoMetrics, seconds: float) -> None:
        names = self.label_map.names_by_category_id()
        self.logger.info(f"epoch {epoch}: AP {metrics.ap:.4f}  AP50 {metrics.ap50:.4f}  ({seconds:.1f} s, "
                         f"{metrics.num_images} images, {metrics.backend})")
        per_class = metrics.per_class_records(names)
        self.logger.evaluation(epoch=epoch, iteration=iteration, metrics=metrics.as_dict(), seconds=seconds,
                               per_class=per_class)
        entry: dict[str, Any] = {"epoch": epoch, "iteration": iteration, **metrics.as_dict(), "per_class": per_class}
        if metrics.diagnostics is not None:
            entry["diagnostics"] = metrics.diagnostics.record(names)
        self.evaluations.append(entry)
        if self.outputs is None or not self.ctx.is_main:
            return
        if metrics.diagnostics is None:
            plot = plot_evaluation(metrics, names, self.outputs.evaluation_plot(epoch), title=f"epoch {epoch}")
            self.logger.info(f"per-class AP and precision-recall curves: {plot}")
            return
        paths = ReportPaths(self.outputs.report(epoch), self.outputs.evaluation_plot(epoch),
                            self.outputs.confusion_plot(epoch), self.outputs.thresholds_plot(epoch))
        report = write_report(paths, metrics, metrics.diagnostics, names, title=f"epoch {epoch}",
                              image_paths=self.image_paths())
        self.outputs.publish(report, REPORT_NAME)
        self.logger.info(f"report (per-class AP, confusion matrix at score >= "
                         f"{metrics.diagnostics.score_threshold:.3f}, P/R/F1 vs threshold, worst images): "
                         f"{self.outputs.report_file}")

    def image_paths(self) -> dict[int, Path]:
        """The validation images' files by image id (for the report's worst images)."""
        return {image_id: self.val_set.path_of(i) for i, image_id in enumerate(self.val_set.image_ids)}

    def recalibrate(self, model: nn.Module, train_loader: Any) -> None:
        inner = unwrap_model(model)
        used = recalibrate_batchnorm(inner, islice(iter(train_loader), self.bn_recalibration), self.ctx.device,
                                     self.channels_last)
        if self.ctx.distributed:  # one set of statistics for every rank: rank 0's
            for buffer in inner.buffers():
                torch.distributed.broadcast(buffer, 0)
        self.logger.info(f"BatchNorm statistics recomputed over {used} training batches")
