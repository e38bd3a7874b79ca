"""The Rank-GRPO authors' line parser (rules 1 and 2 of ``evaluation.py``'s protocol): ``parse_rec_line`` and
``parse_completion``, after ``process_rec_raw`` and its helpers in their ``libs/utils.py``.

Unlike ``parsing.parse_item`` (the rewards' parser, which keeps every item at its rank) a line need only *begin*
with ``Title (Year)``, parenthesised parts of the title are deleted and a line that does not parse is dropped by
the caller: what the paper's numbers were computed with.
"""

from __future__ import annotations

import re

# The authors' line cleaning (libs/utils.py), compiled once. del_space is " ".join(text.split()): re's \s and
# str.split() / str.strip() use the same Unicode whitespace.
_LEAD_FORMAT = re.compile(r"^[*_\-#]+")
_TRAIL_FORMAT = re.compile(r"[*_\-#]+$")
_LEAD_MARKER = re.compile(r"^(?:[*_\-#]+\s+|\d+\s*[.)、\-—–]\s+)")
_LEAD_HASH = re.compile(r"^#+\s*")
_PARENTHESES = re.compile(r"\([^()]*\)")
_TITLE_YEAR_PREFIX = re.compile(r"(.+?)\s+\((\d{4})\)")  # re.match: a prefix, anything may follow
_FORMAT_CHARS = "*_-#"


def _collapse(text: str) -> str:
    """utils.del_space: whitespace runs to one space, ends stripped."""
    return " ".join(text.split())


def _peel_format(text: str) -> str:
    """utils.del_format: ``*_-#`` off both ends, numbering and ``#`` headers off the start, until nothing changes."""
    text = text.strip()
    # Fast path: none of the four substitutions can apply unless an end is a format character or the start a
    # digit (isdigit covers every \\d). The text is stripped at the top of every turn.
    while text and (text[0] in _FORMAT_CHARS or text[-1] in _FORMAT_CHARS or text[0].isdigit()):
        new = _LEAD_FORMAT.sub("", text).strip()
        new = _TRAIL_FORMAT.sub("", new).strip()
        new = _LEAD_MARKER.sub("", new).strip()
        new = _LEAD_HASH.sub("", new)
        if new == text:
            break
        text = new
    return text


def _unquote(text: str) -> str:
    """utils.remove_quotes: one pair of straight double or single quotes around the whole text."""
    if text[:1] in ('"', "'") and text.endswith(text[0]):
        return text[1:-1]
    return text


def parse_rec_line(line: str) -> tuple[str, int] | None:
    """``(title, year)`` of one line by the authors' parser (rule 2 of the module docstring), else None.

    Unlike ``parse_item`` the line need only *begin* with ``Title (Year)`` (with whitespace before the
    parenthesis); parenthesised parts of the title are deleted, ``#`` and ``-`` are peeled like ``*`` and ``_``,
    and only straight quotes are removed. The title keeps its case (the protocol compares titles exactly). As in
    the authors' code, a title that cleans down to nothing (``'"" (1995)'``) parses as ``("", 1995)``.
    """
    if not isinstance(line, str):
        raise TypeError(f"line must be a str, got {type(line).__name__}")
    match = _TITLE_YEAR_PREFIX.match(_unquote(_peel_format(_collapse(line))))
    if match is None:
        return None
    title = match.group(1)
    while True:
        cleaned = _unquote(_peel_format(_collapse(_PARENTHESES.sub("", title.strip()))))
        if cleaned == title:
            return title, int(match.group(2))
        title = cleaned


def parse_completion(completion: str) -> list[tuple[str, int] | None]:
    """One entry per non-blank line of ``completion`` (rule 1): ``parse_rec_line`` of it, None where it does not
    parse. The authors' parsed list is ``[e for e in parse_completion(text) if e is not None]``.

    The lines are those of ``split_items(completion, skip_blank_lines=True)``; this splits them itself so that an
    evaluation run inside a trainer's reward call whose segmentation keeps blank lines is not refused.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return [parse_rec_line(line) for line in completion.split("\n") if line.strip()]
