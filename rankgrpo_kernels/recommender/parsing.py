"""From text and data to comparable ``(title, year)``: the normalised title key, the years of ground-truth and
catalogue entries, and ``Title (Year)`` lines with their list markers, emphasis and quotes peeled off."""

from __future__ import annotations

import re

# A list marker at the start of a line: "1." / "1)" numbering or a "-", "*", "+", "•" bullet, then a space.
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*+•])\s+")
_EMPHASIS = "*_"
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’"}
_TITLE_YEAR = re.compile(r"^(?P<title>.+?)\s*\((?P<year>\d{4})\)$")


def normalize_title(title: str) -> str:
    """The key titles are compared by: whitespace runs collapsed to one space, ends stripped, case-folded."""
    return " ".join(title.split()).casefold()


def _to_year(value, where: str) -> int:
    """A year from an int or a string of digits; anything else is a ValueError naming ``where``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"{where}: the year must be an int or a string of digits, got {value!r}")


def _title_year(entry, where: str) -> tuple[str, int]:
    """(title, year) from a (title, year) pair or a {"title", "year"} mapping (as datasets store structs)."""
    if isinstance(entry, dict) and "title" in entry and "year" in entry:
        entry = (entry["title"], entry["year"])
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
        raise ValueError(f"{where} must be a (title, year) pair or a {{'title', 'year'}} mapping, got {entry!r:.80}")
    return entry[0], _to_year(entry[1], where)


def _strip_decoration(text: str) -> str:
    """Peel list markers, markdown emphasis and matching quotes off both ends until nothing changes, so nested
    forms such as ``1. **"Heat"**`` come off too."""
    while True:
        before = text
        text = _LIST_MARKER.sub("", text).strip(_EMPHASIS).strip()
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
        if text == before:
            return text


def parse_item(line: str, clean: bool = True) -> tuple[str, int] | None:
    """``(title, year)`` for a line ``Title (Year)`` (a four-digit year in parentheses ending the line), else None.

    Whitespace around the line and inside the title is collapsed. ``clean=True`` first peels list numbering
    (``1.``, ``1)``), bullets (``-``, ``*``, ``+``, ``•``), markdown emphasis (``*``, ``_``) and matching quotes off
    the line and off the title, so ``2) **"Heat"** (1995)`` gives ``("Heat", 1995)``. The title keeps its case;
    compare titles with ``normalize_title``.
    """
    if not isinstance(line, str):
        raise TypeError(f"line must be a str, got {type(line).__name__}")
    text = " ".join(line.split())
    if clean:
        text = _strip_decoration(text)
    match = _TITLE_YEAR.match(text)
    if match is None:
        return None
    title = _strip_decoration(match["title"]) if clean else match["title"]
    if not title:
        return None
    return title, int(match["year"])
