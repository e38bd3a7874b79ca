"""Per-rank hits of ranked lists, rank k on the tokens of item k: ``rank_hits`` by the catalogue rules of the
package docstring, ``item_hits`` by plain string match against relevant items."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..segments import split_items
from .catalog import Catalog, _within
from .parsing import _title_year, normalize_title, parse_item


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
    """The hits of one completion's items by the rules of the package docstring; uses up ``pool``."""
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
    """(B, rec_num) float32 hits: ``hits[i, k] = 1.0`` when rank k of completion i is a hit (package docstring).

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
