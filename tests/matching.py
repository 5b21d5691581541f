"""Tie-aware, tolerance-based comparison of detections (shared by the post-processing tests).

Softmax and NMS implementations (vectorised body vs scalar tail, thread splits, CPU instruction
sets, onnxruntime) differ in the last bits, so detections are compared by (label, box, score)
within tolerance, in any order among equal scores, never bit for bit.
"""

from __future__ import annotations

import torch

SCORE_ATOL = 1e-6
BOX_ATOL = 1e-5


def unmatched(got, want, score_atol: float = SCORE_ATOL, box_atol: float = BOX_ATOL) -> list[float]:
    """Pair each detection of ``got`` (boxes (K,4), scores (K,), labels (K,)) with one of ``want``
    of the same label and box and score within tolerance; returns the scores of the detections
    left without a partner, on either side."""
    (gb, gs, gl), (wb, ws, wl) = ([torch.as_tensor(t).cpu() for t in side] for side in (got, want))
    gb, wb, gs, ws = gb.double().reshape(-1, 4), wb.double().reshape(-1, 4), gs.double(), ws.double()
    compatible = (
        (gl.reshape(-1, 1) == wl.reshape(1, -1))
        & ((gs[:, None] - ws[None, :]).abs() <= score_atol)
        & ((gb[:, None, :] - wb[None, :, :]).abs() <= box_atol).all(dim=2)
    )
    used = torch.zeros(len(ws), dtype=torch.bool)
    lonely = []
    for i in range(len(gs)):
        free = (compatible[i] & ~used).nonzero()
        if len(free):
            used[free[0, 0]] = True
        else:
            lonely.append(float(gs[i]))
    return lonely + ws[~used].tolist()


def assert_same_detections(got, want, cuts=(), score_atol: float = SCORE_ATOL, box_atol: float = BOX_ATOL,
                           where: str = "") -> None:
    """One image's detections agree up to tolerance and tie order. A detection may be missing on one
    side only when its score is within tolerance of a cut: one of ``cuts`` (the score threshold) or
    the lowest score kept (where the top-k / max-detections caps cut)."""
    scores = torch.as_tensor(want[1]).double()
    assert torch.all(torch.as_tensor(got[1])[:-1] >= torch.as_tensor(got[1])[1:]), f"{where}: not best first"
    lowest = [float(scores.min())] if len(scores) else []
    for score in unmatched(got, want, score_atol, box_atol):
        assert any(abs(score - cut) <= 2 * score_atol for cut in (*cuts, *lowest)), (
            f"{where}: detection with score {score} on one side only ({len(got[1])} vs {len(want[1])})")
