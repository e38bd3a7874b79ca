"""Recommender rewards: catalogue-grounded per-rank hits for ranked lists of ``Title (Year)`` lines, aligned with the
token items. Not part of the loss library's top-level API: ``from rankgrpo_kernels.recommender import ...``.

Rank k of a completion is the k-th item of ``split_items(completion, skip_blank_lines)``, which is the k-th item
that ``segment_items(..., skip_blank_lines=...)`` finds in its tokens. Every item keeps its rank: a line that does
not parse (a preamble, a remark, a title without a year) is an item that scores 0, it is never dropped, so the
reward of rank k always lands on the tokens of item k. (The authors' parser drops such lines and shifts every later
reward onto the wrong item.)

The item at rank k < rec_num is a hit (1.0, else 0.0) when all of these hold:

1. it parses as ``Title (Year)`` (``parse_item``);
2. the catalogue holds its title with a year within the catalogue's ``year_tolerance`` (default 2; the authors'
   code looks up the exact year, so a year one off missed the catalogue there);
3. the user has not seen the title (titles compared after normalisation, the year plays no part);
4. no earlier item of the list names the same movie: same normalised title, years within the tolerance;
5. an unused ground-truth item has the same normalised title and a year within the tolerance. The closest such
   year is used up (ties go to the later year, as in the authors' code), so one ground-truth item pays once.

Titles are normalised by collapsing whitespace and case-folding (``normalize_title``). Ground-truth and catalogue
entries are ``(title, year)`` pairs (tuples or lists) or ``{"title", "year"}`` mappings, years ints or digit strings.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from os import PathLike

import torch

from .segments import split_items

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


def _within(years: Iterable[int], year: int, tolerance: int) -> bool:
    return any(abs(y - year) <= tolerance for y in years)


class Catalog:
    """The titles a platform can recommend, with their release years, for hit checks.

    Built from ``(title, year)`` pairs (years as ints or digit strings), or from a file with ``from_csv`` /
    ``from_jsonl``. Lookups go through a dict from normalised title to its years, so a check costs one hash and a
    few comparisons. ``year_tolerance`` (an int >= 0) is how far a recommended year may be from a catalogue or
    ground-truth year and still name the same movie.
    """

    def __init__(self, items: Iterable[tuple[str, int | str]], year_tolerance: int = 2):
        if not isinstance(year_tolerance, int) or isinstance(year_tolerance, bool) or year_tolerance < 0:
            raise ValueError(f"year_tolerance must be an int >= 0, got {year_tolerance!r}")
        self.year_tolerance = year_tolerance
        years_by_title: dict[str, set[int]] = {}
        for n, item in enumerate(items):
            title, year = _title_year(item, f"items[{n}]")
            years_by_title.setdefault(normalize_title(title), set()).add(year)
        self._years = {title: frozenset(years) for title, years in years_by_title.items()}

    @classmethod
    def from_csv(
        cls, path: str | PathLike, year_tolerance: int = 2, title_column: str = "title", year_column: str = "year"
    ) -> "Catalog":
        """A catalogue from a CSV file whose header names a title and a year column (other columns are ignored)."""
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            missing = {title_column, year_column} - set(rows.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: the CSV header lacks the column(s) {sorted(missing)}")
            return cls(((row[title_column], row[year_column]) for row in rows), year_tolerance)

    @classmethod
    def from_jsonl(
        cls, path: str | PathLike, year_tolerance: int = 2, title_key: str = "title", year_key: str = "year"
    ) -> "Catalog":
        """A catalogue from a JSON-lines file, one object with a title and a year per line (blank lines skipped)."""
        pairs = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or title_key not in record or year_key not in record:
                    raise ValueError(f"{path}:{line_number}: expected an object with {title_key!r} and {year_key!r}")
                pairs.append((record[title_key], record[year_key]))
        return cls(pairs, year_tolerance)

    def __len__(self) -> int:
        """The number of distinct (normalised title, year) entries."""
        return sum(len(years) for years in self._years.values())

    def years(self, title: str) -> frozenset[int]:
        """The catalogue years of a title (compared after normalisation); empty when the title is absent."""
        return self._years.get(normalize_title(title), frozenset())

    def contains(self, title: str, year: int) -> bool:
        """Whether the catalogue holds the title with a year within ``year_tolerance`` of ``year``."""
        return _within(self.years(title), year, self.year_tolerance)

    def __contains__(self, item: tuple[str, int]) -> bool:
        return self.contains(*item)

    def __repr__(self) -> str:
        return f"Catalog({len(self._years)} titles, {len(self)} entries, year_tolerance={self.year_tolerance})"


def _check_settings(catalog, rec_num) -> None:
    if not isinstance(catalog, Catalog):
        raise TypeError(f"catalog must be a Catalog, got {type(catalog).__name__}")
    if not isinstance(rec_num, int) or isinstance(rec_num, bool) or rec_num < 1:
        raise ValueError(f"rec_num must be an int >= 1, got {rec_num!r}")


def _check_batch(values, name: str, batch_size: int | None = None) -> None:
    """``values`` must be a list (one entry per completion) of ``batch_size`` entries when that is given."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list with one entry per completion, got {type(values).__name__}")
    if batch_size is not None and len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries but there are {batch_size} completions")


def _ground_truth_pool(pairs, where: str) -> dict[str, list[int]]:
    """Normalised title -> years of the ground-truth items not yet used."""
    if isinstance(pairs, (str, bytes)):
        raise TypeError(f"{where} must be a list of (title, year) pairs, got a {type(pairs).__name__}")
    pool: dict[str, list[int]] = {}
    for n, pair in enumerate(pairs):
        title, year = _title_year(pair, f"{where}[{n}]")
        pool.setdefault(normalize_title(title), []).append(year)
    return pool


def _seen_titles(entries, where: str) -> set[str]:
    """Normalised titles the user has seen, from titles or (title, year) entries (the year is not compared)."""
    if entries is None:
        return set()
    if isinstance(entries, (str, bytes)):
        raise TypeError(f"{where} must be a list of titles or (title, year) pairs, got a {type(entries).__name__}")
    titles = set()
    for n, entry in enumerate(entries):
        title = entry if isinstance(entry, str) else _title_year(entry, f"{where}[{n}]")[0]
        titles.add(normalize_title(title))
    return titles


def _take_closest(years: list[int], year: int, tolerance: int) -> bool:
    """Remove the closest year within the tolerance (ties: the later year); whether one was there."""
    candidates = [y for y in years if abs(y - year) <= tolerance]
    if not candidates:
        return False
    years.remove(min(candidates, key=lambda y: (abs(y - year), -y)))
    return True


def _row_hits(items, pool, seen, catalog: Catalog, rec_num: int, clean: bool) -> list[float]:
    """The hits of one completion's items by the rules of the module docstring; uses up ``pool``."""
    tolerance = catalog.year_tolerance
    recommended: dict[str, list[int]] = {}  # normalised title -> years of the earlier parsed items
    hits = [0.0] * rec_num
    for rank, line in enumerate(items[:rec_num]):
        parsed = parse_item(line, clean)
        if parsed is None:
            continue
        key, year = normalize_title(parsed[0]), parsed[1]
        repeat = _within(recommended.get(key, ()), year, tolerance)
        recommended.setdefault(key, []).append(year)
        if repeat or key in seen or not catalog.contains(key, year):
            continue
        if _take_closest(pool.get(key, []), year, tolerance):
            hits[rank] = 1.0
    return hits


def rank_hits(
    completions: Sequence[str],
    ground_truth: Sequence[Iterable[tuple[str, int | str]]],
    seen: Sequence[Iterable[str | tuple[str, int | str]]] | None,
    catalog: Catalog,
    rec_num: int,
    skip_blank_lines: bool = True,
    *,
    clean: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, rec_num) float32 hits: ``hits[i, k] = 1.0`` when rank k of completion i is a hit (module docstring).

    Args:
        completions: B decoded completions (str, without the EOS token).
        ground_truth: per completion, the (title, year) entries the user went on to like.
        seen: per completion, the titles (or (title, year) entries) the user has already seen; None for none.
        catalog: the ``Catalog``; its ``year_tolerance`` applies to every year comparison.
        rec_num: N, the number of ranks. Items past rank N - 1 are ignored; ranks the list does not reach are 0.
        skip_blank_lines: how items are split, as in ``split_items`` and ``segment_items``; pass the value the
            loss segments with.
        clean: let ``parse_item`` peel list numbering, bullets, emphasis and quotes.
        device: where the returned tensor lives (default CPU).
    """
    _check_settings(catalog, rec_num)
    _check_batch(completions, "completions")
    for i, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise TypeError(f"completions[{i}] must be a str, got {type(completion).__name__}")
    _check_batch(ground_truth, "ground_truth", len(completions))
    if seen is not None:
        _check_batch(seen, "seen", len(completions))
    rows = [
        _row_hits(
            split_items(completion, skip_blank_lines),
            _ground_truth_pool(ground_truth[i], f"ground_truth[{i}]"),
            _seen_titles(None if seen is None else seen[i], f"seen[{i}]"),
            catalog,
            rec_num,
            clean,
        )
        for i, completion in enumerate(completions)
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(rows), rec_num)


def _completion_text(completion, i: int) -> str:
    """The text of a plain completion, or the last message's content of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(
        f"completions[{i}] must be a str or a non-empty list of {{'role', 'content'}} messages with str content, "
        f"got {completion!r:.80}"
    )


def make_rank_hit_reward(catalog: Catalog, rec_num: int, skip_blank_lines: bool = True, *, clean: bool = True):
    """A TRL-style reward function returning per-rank hit lists, built on ``rank_hits``.

    The returned ``rank_hit_reward(prompts, completions, ground_truth=..., seen=None, **kwargs)`` takes the
    completions as strings or, for conversational data, as lists of ``{"role", "content"}`` messages (the last
    message's content is scored), and the dataset columns ``ground_truth`` (per completion, (title, year) entries;
    ``{"title", "year"}`` structs suit Arrow datasets) and ``seen`` (optional, per completion, titles). Other keyword
    arguments (``completion_ids``, ``trainer_state``, ...) are ignored. It returns one list of ``rec_num`` floats in
    {0.0, 1.0} per completion: per-rank rewards for a Rank-GRPO trainer (``rank_rewards`` turns the hits into
    discounted rewards), not the one float per completion a stock GRPO trainer expects.
    """
    _check_settings(catalog, rec_num)

    def rank_hit_reward(prompts, completions, ground_truth=None, seen=None, **kwargs) -> list[list[float]]:
        if ground_truth is None:
            raise ValueError(
                "ground_truth is missing: the dataset needs a 'ground_truth' column of (title, year) pairs"
            )
        _check_batch(completions, "completions")
        if prompts is not None:
            _check_batch(prompts, "prompts", len(completions))
        texts = [_completion_text(completion, i) for i, completion in enumerate(completions)]
        hits = rank_hits(texts, ground_truth, seen, catalog, rec_num, skip_blank_lines, clean=clean)
        return hits.tolist()

    return rank_hit_reward


def item_hits(text: str, relevant: Iterable[str], rec_num: int, skip_blank_lines: bool = True) -> list[float]:
    """Per-rank hits (N floats in {0, 1}) of a decoded completion against the relevant items.

    The items are ``split_items(text, skip_blank_lines)``, the very items the token segmentation finds with the same
    ``skip_blank_lines``; an item is a hit when its stripped text is in ``relevant`` and did not occur at an earlier
    rank (repeating a title earns nothing). Ranks past the end of the list score 0; items past N are ignored.
    """
    wanted = {title.strip() for title in relevant}
    hits, seen = [], set()
    for item in split_items(text, skip_blank_lines=skip_blank_lines)[:rec_num]:
        title = item.strip()
        hits.append(float(title in wanted and title not in seen))
        seen.add(title)
    return hits + [0.0] * (rec_num - len(hits))
