"""Figures and drawn boxes with real class names: CJK, emoji, accents, long names, many categories.

No glyph warnings reach the console whatever fonts the machine has (characters no installed font
has become a box), the labels are on the Axes (read from the tick labels and legend, not pixels),
and the PR legend names the classes that have curves, capped with a "+N more" note.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from ssd300 import fonts
from ssd300.coco_eval import RECALL_POINTS, CocoMetrics
from ssd300.plots import LEGEND_MAX, evaluation_figure, plot_evaluation, short_label

NAMES = {1: "行人", 2: "自転車 🚲", 3: "🐶", 4: "Ærøskøbing façade",
         5: "a very long class name from a labelling tool export, version two"}
LONG = NAMES[5]


def _metrics(with_truth: list[int], without_truth: list[int] = ()) -> CocoMetrics:
    per_class = {cid: {"AP": 0.5 + 0.01 * i, "AP50": 0.6 + 0.01 * i} for i, cid in enumerate(with_truth)}
    per_class.update({cid: {"AP": -1.0, "AP50": -1.0} for cid in without_truth})
    curves = {cid: list(np.linspace(1, 0, RECALL_POINTS)) for cid in with_truth}
    return CocoMetrics(per_class=per_class, pr_curves=curves)


def _has_glyph(ch: str) -> bool:
    return any(ord(ch) in fonts._charmap(path) for _, path in fonts._installed_fonts())


def _render_quietly(tmp_path, metrics, names, caplog):
    """Write the figure; return the warnings and log records about glyphs or fonts."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plot_evaluation(metrics, names, tmp_path / "evaluation.png", title="epoch 0")
    noisy = [str(w.message) for w in caught if "glyph" in str(w.message).lower() or "font" in str(w.message).lower()]
    noisy += [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and ("glyph" in r.getMessage().lower() or "findfont" in r.getMessage())]
    return path, noisy


def test_cjk_emoji_accented_and_long_names_render_without_glyph_warnings_and_label_the_axes(tmp_path, caplog):
    fonts._announce.cache_clear()
    metrics = _metrics(list(NAMES))
    path, noisy = _render_quietly(tmp_path, metrics, NAMES, caplog)
    assert path.stat().st_size > 10_000 and noisy == []

    fig = evaluation_figure(metrics, NAMES, title="epoch 0")
    ax_bars, ax_pr = fig.axes
    ticks = [t.get_text() for t in ax_bars.get_xticklabels()]
    legend = [t.get_text() for t in ax_pr.get_legend().get_texts()]
    assert len(ticks) == len(legend) == len(NAMES)
    assert ticks[3] == "Ærøskøbing façade"  # DejaVu Sans has these: kept as they are
    for cid, tick in zip(NAMES, ticks):  # every character is itself, or a box when no font has it
        name = NAMES[cid]
        if cid == 5:
            continue
        kept = [ch for ch in name if ch.isspace() or _has_glyph(ch)]
        assert all(ch in tick for ch in kept)
        assert tick.count(fonts.MISSING_GLYPH) == sum(1 for ch in name if not ch.isspace() and not _has_glyph(ch))
    # The long name is wrapped on two lines of at most 18 columns, the rest elided.
    lines = ticks[4].split("\n")
    assert len(lines) == 2 and lines[0] == "a very long class" and lines[1].endswith("\u2026")
    assert all(len(line) <= 18 for line in lines) and LONG.startswith(ticks[4].replace("\n", " ")[:-1])
    assert ax_bars.get_xticklabels()[0].get_rotation() == 60  # long labels are rotated
    # The legend names each curve (one line) with its AP50, best first.
    assert legend[0].startswith(short_label(NAMES[5], 24, 1)) and legend[0].endswith("(0.64)")
    assert any(text.startswith("Ærøskøbing façade") for text in legend)
    # Said once which fonts draw the names (only when DejaVu Sans alone cannot).
    if not all(_has_glyph(ch) for name in NAMES.values() for ch in name if not ch.isspace()) or \
            not all(ord(ch) in fonts._charmap(fonts._installed_fonts()[0][1])
                    for name in NAMES.values() for ch in name if not ch.isspace()):
        notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class names are drawn with")]
        assert len(notes) == 1 and "DejaVu Sans" in notes[0]


def test_a_character_dejavu_lacks_is_drawn_with_another_installed_font(tmp_path, caplog):
    """U+2312 (ARC) is in matplotlib's STIX fonts but not in DejaVu Sans: a fallback font is added
    for it (glyph by glyph), so it is kept, not boxed, and nothing warns."""
    dejavu = fonts._installed_fonts()[0][1]
    assert ord("\u2312") not in fonts._charmap(dejavu)
    choice = fonts.choose_fonts(["arc \u2312"])
    assert choice.families[0] == "DejaVu Sans" and len(choice.families) == 2 and not choice.missing
    names = {1: "arc \u2312", 2: "plain"}
    path, noisy = _render_quietly(tmp_path, _metrics([1, 2]), names, caplog)
    assert noisy == []
    ticks = [t.get_text() for t in evaluation_figure(_metrics([1, 2]), names).axes[0].get_xticklabels()]
    assert ticks == ["arc \u2312", "plain"]


def test_without_the_package_fallback_matplotlib_itself_would_warn(tmp_path):
    """The check above is meaningful: drawing a CJK name with DejaVu Sans alone warns."""
    if all(_has_glyph(ch) for ch in "行人"):
        pytest.skip("a CJK font is installed here")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().set_title("行人")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "raw.png")
    assert any("missing from font" in str(w.message) for w in caught)


def test_legend_lists_the_classes_with_curves_when_the_file_has_many_categories(tmp_path, caplog):
    names = {cid: f"category {cid}" for cid in range(1, 31)}
    metrics = _metrics([4, 17, 29], without_truth=[c for c in names if c not in (4, 17, 29)])
    _, noisy = _render_quietly(tmp_path, metrics, names, caplog)
    assert noisy == []
    fig = evaluation_figure(metrics, names)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert len(legend) == 3
    assert {text.split(" (")[0] for text in legend} == {"category 4", "category 17", "category 29"}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["category 4", "category 17", "category 29"]


def test_legend_is_capped_with_a_note_of_the_rest(tmp_path):
    names = {cid: f"c{cid}" for cid in range(1, 26)}
    fig = evaluation_figure(_metrics(list(names)), names)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert len(legend) == LEGEND_MAX + 1 and legend[-1] == f"+{25 - LEGEND_MAX} more"
    assert legend[0].startswith("c25 ")  # best AP50 first


def test_short_label_wraps_by_display_width():
    assert short_label("person") == "person"
    assert short_label("長い名前の自転車と歩行者と犬", width=8) == "長い名前\nの自転…"
    assert short_label("x" * 40, width=10) == "x" * 10 + "\n" + "x" * 9 + "\u2026"


def test_drawn_boxes_keep_names_and_box_what_no_font_has():
    import torch

    from ssd300.visualize import draw_detections

    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    font, choice = fonts.single_font(["行人 0.90", "Ærø 0.50"])
    assert font is not None and choice.clean("Ærø") == "Ærø"
    expected = "".join(ch if ch.isspace() or ord(ch) in fonts._charmap(font) else fonts.MISSING_GLYPH
                       for ch in "行人")
    assert choice.clean("行人") == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = draw_detections(image, [[10, 10, 100, 80], [20, 30, 150, 110]], [1, 2], [0.9, 0.5],
                              class_names={1: "行人", 2: "Ærø"})
    assert out.shape == (3, 120, 160) and int(out.sum()) > 0
    assert not [w for w in caught if "glyph" in str(w.message).lower()]
