"""Fonts for class names in figures (:mod:`ssd300.plots`) and drawn boxes (:mod:`ssd300.visualize`).

Class names come from the user's annotation file: accents, CJK, emoji, any length. Matplotlib
ships DejaVu Sans only, so other fonts installed on the machine (found through matplotlib's font
list, e.g. Debian's ``fonts-noto-cjk``) are added when a name needs them; a character that no
usable font has is drawn as ``□`` (and a zero-width mark such as an emoji variation selector is
dropped), so matplotlib never warns about missing glyphs. Which fonts were used is logged once.
Nothing here needs extra fonts installed.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)

DEFAULT_FAMILY = "DejaVu Sans"  # matplotlib's default, shipped with it
MISSING_GLYPH = "\u25a1"  # WHITE SQUARE, in DejaVu Sans
# Preferred fallbacks, in order (substring of the family name); any other installed font is tried after.
_PREFERRED = ("Noto Sans CJK", "Noto Sans SC", "Noto Sans JP", "Noto Sans KR", "Source Han Sans", "WenQuanYi",
              "Droid Sans Fallback", "Noto Sans", "Noto Emoji", "Symbola", "Arial Unicode MS", "Microsoft YaHei",
              "PingFang", "Hiragino Sans", "Segoe UI Symbol", "Segoe UI Emoji")
# Not used: colour-bitmap emoji fonts (CBDT/sbix: FreeType cannot scale them for matplotlib or PIL),
# and matplotlib's Last Resort font (a placeholder box for every code point, not a glyph).
_NOT_USED = ("color emoji", "last resort")
_MAX_FONTS_TRIED = 200  # bounds the cmap reads on a machine with thousands of fonts


@dataclass(frozen=True)
class FontChoice:
    """The fonts for a set of texts: ``families``/``files`` in fallback order (DejaVu Sans first),
    and the characters none of them has (``clean`` replaces them)."""

    families: tuple[str, ...]
    files: tuple[str, ...]
    missing: frozenset[str]

    def clean(self, text: str) -> str:
        """``text`` with each character no font has as ``□`` (zero-width marks dropped)."""
        if not self.missing or not any(ch in self.missing for ch in text):
            return text
        return "".join(ch if ch not in self.missing else
                       "" if unicodedata.category(ch) in ("Mn", "Me", "Cf") else MISSING_GLYPH for ch in text)


@functools.lru_cache(maxsize=1)
def _installed_fonts() -> tuple[tuple[str, str], ...]:
    """(family, file) of matplotlib's font list: DejaVu Sans first, the preferred fallbacks next."""
    try:
        from matplotlib import font_manager
    except Exception:  # matplotlib missing or broken: nothing to choose from
        return ()
    entries = {(f.name, f.fname) for f in font_manager.fontManager.ttflist
               if f.style == "normal" and not any(b in f.name.lower() for b in _NOT_USED)}

    def rank(entry: tuple[str, str]) -> tuple[int, str, str]:
        name = entry[0]
        if name == DEFAULT_FAMILY:
            return (0 if entry[1].endswith("DejaVuSans.ttf") else 1, name, entry[1])
        preferred = [i for i, p in enumerate(_PREFERRED) if p.lower() in name.lower()]
        return (2 + preferred[0] if preferred else 2 + len(_PREFERRED), name, entry[1])

    return tuple(sorted(entries, key=rank))


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    try:
        from matplotlib.ft2font import FT2Font

        return frozenset(FT2Font(path).get_charmap())
    except Exception:  # an unreadable font file is just not used
        return frozenset()


def choose_fonts(texts: Iterable[str]) -> FontChoice:
    """DejaVu Sans plus, for characters it lacks, the first installed fonts that have them."""
    needed = {ch for text in texts for ch in text if ch.isprintable() and not ch.isspace()}
    fonts = _installed_fonts()
    families: list[str] = []
    files: list[str] = []
    missing = set(needed)
    for tried, (family, path) in enumerate(fonts):
        if tried >= _MAX_FONTS_TRIED or (families and not missing):
            break
        covered = {ch for ch in missing if ord(ch) in _charmap(path)}
        if (covered or not families) and family not in families:
            families.append(family)
            files.append(path)
            missing -= covered
    choice = FontChoice(tuple(families) or (DEFAULT_FAMILY,), tuple(files), frozenset(missing))
    _announce(choice.families, bool(choice.missing))
    return choice


@functools.lru_cache(maxsize=None)
def _announce(families: tuple[str, ...], missing: bool) -> None:
    """Say once per process which fonts draw class names (only when DejaVu Sans alone does not)."""
    if len(families) == 1 and not missing:
        return
    note = f"; characters no installed font has are drawn as {MISSING_GLYPH} " \
           "(fonts-noto-cjk or fonts-noto-core add many)" if missing else ""
    log.info("class names are drawn with %s%s", " + ".join(families), note)


def single_font(texts: Iterable[str]) -> tuple[str | None, FontChoice]:
    """One font file for a renderer without fallback (PIL): the chosen file covering most of the
    characters of ``texts``, and a :class:`FontChoice` whose ``clean`` replaces what it lacks."""
    texts = list(texts)
    choice = choose_fonts(texts)
    if not choice.files:
        return None, choice
    needed = {ch for text in texts for ch in text if ch.isprintable() and not ch.isspace()}
    best = max(choice.files, key=lambda path: sum(ord(ch) in _charmap(path) for ch in needed))
    lacking = frozenset(ch for ch in needed if ord(ch) not in _charmap(best))
    return best, FontChoice((choice.families[choice.files.index(best)],), (best,), lacking)
