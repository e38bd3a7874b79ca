"""The catalogue a platform can recommend from, read from pairs, CSV or JSON lines, and the year tolerance every
hit check applies."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from os import PathLike

from .parsing import _title_year, normalize_title


def _within(years: Iterable[int], year: int, tolerance: int) -> bool:
    """Whether one of ``years`` is within ``tolerance`` of ``year``, i.e. may name the same movie."""
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
    ) -> Catalog:
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
    ) -> Catalog:
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
