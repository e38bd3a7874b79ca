"""Recall@K and NDCG@K of ranked ``Title (Year)`` lists under the Rank-GRPO authors' evaluation protocol, the
numbers the paper (arXiv 2510.20150) reports for K = 5, 10, 15, 20.

Source: github ``yaochenzhu/Rank-GRPO`` (HEAD 0808d82): ``libs/utils.py`` (``process_rec_raw`` and its helpers
``del_space``, ``del_format``, ``remove_quotes``, ``del_parentheses``), ``libs/metrics.py`` (``remove_seen``,
``remove_gt_catalog``, ``evaluate_direct_match``, ``recall_at_k``, ``dcg_at_k``, ``ndcg_at_k``) and
``evaluate/eval_grpo_test.py``, ``eval_grpo_val.py``, ``eval_sft_val.py``. Those scripts import
``evaluate_direct_match_truncate`` from ``metrics``, which no commit defines; the function that exists,
``evaluate_direct_match``, is what is reproduced here (its metric functions already truncate the list at K).

The protocol, rule by rule (each checked against the function named in brackets):

1. Lines. The completion is split on ``"\\n"``, lines are stripped and blank ones dropped
   [``process_rec_raw``: ``re.sub(r'\\n+', '\\n', ...)``, then ``split('\\n')``].
2. Parsing [``process_rec_raw``; ``authors_parsing.py``]. Whitespace runs become one space; ``*``, ``_``, ``-``,
   ``#`` are peeled off both ends, together with list numbering (``1.``, ``1)``, ``1、``, ``1-``, ``1—``,
   ``1–``, then a space) and ``#`` headers, until nothing changes [``del_format``]; one pair of straight quotes
   around the whole line goes [``remove_quotes``]. The line must then *begin* with ``Title (Year)``: a title,
   whitespace, a four-digit year in parentheses, anything after it (``Heat (1995) - a heist film`` parses;
   ``Heat(1995)`` does not, the space is required). The title is then cleaned until it stops changing:
   parenthesised parts deleted (``Amélie (Le Fabuleux Destin)`` gives ``Amélie``), whitespace collapsed, the
   decoration above and one pair of quotes peeled.
   A line that does not parse (a preamble, a title without a year) is dropped.
3. Seen. An item whose title is *exactly* (case-sensitive) a title the user has seen is dropped; the year plays no
   part [``remove_seen``: ``rec[0] not in seen_titles``].
4. Catalogue. An item is dropped unless the catalogue holds its title with *exactly* its year, no tolerance
   [``remove_gt_catalog``: ``rec in gt_catalog``, a set of ``(title, year)`` pairs].
5. Rank compression. The items left are ranked 0..n-1 (ranks 1..n) in their order, so every dropped line moves the
   later items up [``evaluate_direct_match`` builds ``hits`` over the filtered list].
6. Hits. Each ground-truth item takes the *first* item of the filtered list with the same title (exact,
   case-sensitive: ``editdistance == 0``) and a year within 2 (``year_tolerance``); that item is a hit
   [``evaluate_direct_match``]. Items are not used up: two ground-truth entries may take the same item, which is
   one hit. A repeated title is a hit at its first occurrence only; the repeat keeps its rank and scores 0.
7. Recall@K = (number of hits among ranks r < K) / |gt| [``recall_at_k``]. |gt| counts every ground-truth entry,
   so Recall@K <= K / |gt| stays below 1 when K < |gt|.
8. NDCG@K = DCG@K / IDCG@K, with DCG@K = sum over hits at ranks r < K of 1 / log2(r + 2) (r 0-based, so rank 0
   weighs 1) [``dcg_at_k``] and the authors' normaliser IDCG@K = sum_{r < m} 1 / log2(r + 2) with
   **m = min(K, |gt|, n)**, n the length of the *filtered* list [``ndcg_at_k``: the ideal hits are
   ``zeros(len(hits))`` with ``[:num_gt] = 1``, cut at ``min(k, len(hits))``]. The list length caps the ideal: a
   list that keeps one item, a hit, scores NDCG 1 whatever |gt|. ``ndcg_normalizer="standard"`` uses
   m = min(K, |gt|) instead. A list with nothing left scores 0 on both metrics [``recall_at_k``, ``ndcg_at_k``].
9. Each metric is the mean over samples [``evaluate/eval_grpo_test.py``: ``np.mean``].

``compress_ranks=False``: rules 1-4 and 6 stand, but every non-blank line (every entry of a parsed list) keeps its
rank slot; a line that does not parse, a seen item, an item outside the catalogue or a repeat scores 0 in place,
and n in rule 8 counts all the slots. The same items are hits, each at the same or a later rank, and the ideal is
no smaller, so neither metric ever exceeds its compressed value. Side by side, ground truth ``Heat (1995)``,
``Alien (1979)``, seen ``Jaws``, a catalogue with Heat, Alien, Jaws and Up, and the completion::

    Here are some films you might like:      slot 0  unparsable        dropped
    1. Jaws (1975)                           slot 1  seen              dropped
    2. Made Up Movie (2020)                  slot 2  not in catalogue  dropped
    3. **Heat** (1995)                       slot 3  hit               compressed rank 0
    4. Up (2009)                             slot 4  miss              compressed rank 1
    5. Alien (1979)                          slot 5  hit               compressed rank 2

    compress_ranks=True   hits at ranks 0, 2; n = 3   Recall@5 = 2/2 = 1
        NDCG@5 = (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.63093 = 0.91972           (m = min(5, 2, 3) = 2)
    compress_ranks=False  hits at ranks 3, 5; n = 6   Recall@5 = 1/2 = 0.5, Recall@10 = 1
        NDCG@5 = (1/log2 5) / 1.63093 = 0.26407, NDCG@10 = (1/log2 5 + 1/log2 7) / 1.63093 = 0.48248

Where this module differs from the authors (per-sample values checked equal to theirs on 7,000 random samples):

* ``catalog`` as a ``Catalog`` compares titles after ``normalize_title`` (case-folded, whitespace collapsed), since
  that is all a ``Catalog`` keeps; the year is still exact. A wrong-case title then stays in the list (it cannot
  hit, the hit check is case-sensitive) and holds a rank. Pass the authors' own catalogue, an iterable of
  ``(title, year)`` pairs, for their exact, case-sensitive ``rec in gt_catalog``.
* An empty ground truth is a ``ValueError`` naming the sample (the authors divide by |gt|: nan, or 0 when the
  filtered list is empty).
* Years of ground-truth and catalogue entries are ints or digit strings (``(title, "1995")`` is in a catalogue of
  ``(title, 1995)``, as pull request #3's ``libs/catalog.py`` makes theirs); a ground-truth entry without one is
  an error.

Diagnostics beside the metrics: ``in_catalog_rate`` is the authors' catalogue-match ratio [``eval_sft_val.py`` and
``eval_grpo_val.py``, step 6]: per sample, the share of its first max(ks) parsed items (before the seen and
catalogue filters; their ``[:20]``) whose title the catalogue holds with a year within the catalogue's tolerance
(they lower-case the title and allow 2 years), 0 for a sample with no parsed item, averaged over samples.
``parse_failure_rate`` (ours) is the share of all non-blank lines, pooled over samples, that do not parse.

Differences from ``rank_hits`` (the training reward, ``hits.py``), which must keep every rank on its tokens:
``rank_hits`` never compresses ranks; it parses with ``parse_item`` (the whole line is ``Title (Year)``, curly
quotes too, parentheses kept in the title); it compares titles case-folded for the seen, catalogue and ground-truth
checks; it applies the catalogue's year tolerance to the catalogue check; it skips a repeat explicitly; and each
recommended item uses up the ground-truth item of the closest year, so two ground-truth entries of one title can
pay two items there but one here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .authors_parsing import parse_completion
from .catalog import Catalog
from .hits import _check_batch
from .parsing import _title_year

_NORMALIZERS = ("authors", "standard")


@dataclass(frozen=True)
class RankingMetrics:
    """The result of ``evaluate_lists``.

    Attributes:
        ks: the cut-offs, ascending, without repeats.
        num_samples: the number of samples averaged over.
        recall, ndcg: K -> the mean of Recall@K / NDCG@K over the samples (Python floats).
        recall_per_sample, ndcg_per_sample: K -> a (num_samples,) float64 tensor, for spreads and paired tests.
        hits: (num_samples, max(ks)) float32, ``hits[i, r] = 1`` when sample i has a hit at rank r (compressed or
            not, as evaluated).
        hit_rate_at_rank: (max(ks),) float64, the share of samples with a hit at rank r (``hits.mean(0)``).
        in_catalog_rate: the authors' catalogue-match ratio (module docstring).
        parse_failure_rate: the share of non-blank lines (entries of parsed lists) that did not parse.
        compress_ranks, ndcg_normalizer, year_tolerance: the settings the numbers were computed with.
    """

    ks: tuple[int, ...]
    num_samples: int
    recall: Mapping[int, float]
    ndcg: Mapping[int, float]
    recall_per_sample: Mapping[int, torch.Tensor]
    ndcg_per_sample: Mapping[int, torch.Tensor]
    hits: torch.Tensor
    hit_rate_at_rank: torch.Tensor
    in_catalog_rate: float
    parse_failure_rate: float
    compress_ranks: bool
    ndcg_normalizer: str
    year_tolerance: int

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"recall@5": ..., "ndcg@5": ..., ..., "in_catalog_rate": ..., "parse_failure_rate": ...}``."""
        out = {}
        for k in self.ks:
            out[f"recall@{k}"] = self.recall[k]
            out[f"ndcg@{k}"] = self.ndcg[k]
        out["in_catalog_rate"] = self.in_catalog_rate
        out["parse_failure_rate"] = self.parse_failure_rate
        return out


def _check_ks(ks) -> tuple[int, ...]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be an int or a sequence of ints, got {type(ks).__name__}")
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks is empty: give at least one cut-off K")
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"ks must hold ints, got {k!r} ({type(k).__name__})")
        if k < 1:
            raise ValueError(f"ks must hold ints >= 1, got {k!r}")
    return tuple(sorted(set(ks)))


def _catalogue_checks(catalog):
    """(exact, tolerant): ``exact(title, year)`` is rule 4, ``tolerant(title, year)`` the in-catalogue ratio."""
    if isinstance(catalog, Catalog):
        if len(catalog) == 0:
            raise ValueError("catalog is empty: no item could pass the catalogue filter")
        years = catalog.years
        return (lambda title, year: year in years(title)), catalog.contains
    if isinstance(catalog, (str, bytes, Mapping)) or not isinstance(catalog, Iterable):
        raise TypeError(f"catalog must be a Catalog or an iterable of (title, year) pairs, got "
                        f"{type(catalog).__name__}")
    pairs = {_title_year(entry, f"catalog entry {n}") for n, entry in enumerate(catalog)}
    if not pairs:
        raise ValueError("catalog is empty: no item could pass the catalogue filter")
    return (lambda title, year: (title, year) in pairs), Catalog(pairs).contains


def _entries(completion, where: str) -> list[tuple[str, int] | None]:
    """The slots of one sample: parsed lines of a str, or the (title, year) / None entries of a parsed list."""
    if isinstance(completion, str):
        return parse_completion(completion)
    if isinstance(completion, (bytes, Mapping)) or not isinstance(completion, Sequence):
        raise TypeError(f"{where} must be a str (a decoded completion) or a list of (title, year) pairs, got "
                        f"{type(completion).__name__}")
    return [None if entry is None else _title_year(entry, f"{where}[{j}]") for j, entry in enumerate(completion)]


def _ground_truth(entries, where: str) -> tuple[dict[str, list[list[int]]], int]:
    """Exact title -> a [year, taken] pair per ground-truth entry of that title; and the number of entries."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
        raise TypeError(f"{where} must be a list of (title, year) pairs, got {type(entries).__name__}")
    by_title: dict[str, list[list[int]]] = {}
    count = 0
    for n, entry in enumerate(entries):
        title, year = _title_year(entry, f"{where}[{n}]")
        by_title.setdefault(title, []).append([year, 0])
        count += 1
    if count == 0:
        raise ValueError(f"{where} is empty: Recall@K divides by the number of ground-truth items; leave the "
                         "sample out")
    return by_title, count


def _seen(entries, where: str) -> set[str] | frozenset:
    """Exact titles the user has seen (rule 3), from titles or (title, year) entries."""
    if entries is None:
        return frozenset()
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
        raise TypeError(f"{where} must be a list of titles or (title, year) pairs, got {type(entries).__name__}")
    return {entry if isinstance(entry, str) else _title_year(entry, f"{where}[{n}]")[0]
            for n, entry in enumerate(entries)}


def evaluate_lists(
    completions: Sequence[str | Sequence[tuple[str, int | str] | None]],
    ground_truth: Sequence[Iterable[tuple[str, int | str]]],
    seen: Sequence[Iterable[str | tuple[str, int | str]] | None] | None,
    catalog: Catalog | Iterable[tuple[str, int | str]],
    ks: int | Iterable[int] = (5, 10, 15, 20),
    *,
    compress_ranks: bool = True,
    ndcg_normalizer: str = "authors",
    year_tolerance: int = 2,
) -> RankingMetrics:
    """Recall@K and NDCG@K of ranked lists by the authors' protocol (module docstring), with per-sample values.

    Args:
        completions: one entry per sample: a decoded completion (str), or an already parsed list of
            ``(title, year)`` pairs / ``{"title", "year"}`` mappings, where None stands for a line that did not
            parse (it keeps a slot when ``compress_ranks=False``).
        ground_truth: per sample, the non-empty ``(title, year)`` pairs or mappings the user went on to like
            (years ints or digit strings). Duplicates count in |gt|, as in the authors' code.
        seen: per sample, the titles (or ``(title, year)`` entries) the user has seen, or None; None for none at all.
        catalog: a ``Catalog`` (titles compared normalised, years exactly), or the authors' catalogue as an
            iterable of ``(title, year)`` pairs (compared exactly).
        ks: the cut-offs K (ints >= 1); an int for one.
        compress_ranks: True (the authors'): the items left after the filters are ranked 1..n. False: every line
            keeps its rank slot and a dropped one scores 0.
        ndcg_normalizer: "authors": IDCG over min(K, |gt|, n), n the evaluated list's length; "standard":
            over min(K, |gt|).
        year_tolerance: how far a recommended year may be from a ground-truth year and still hit (authors: 2).

    Raises:
        TypeError / ValueError naming the argument (and sample index) at fault: completions that are not a list,
        a completion neither a str nor a list of pairs, mismatched lengths, no samples, an empty ground truth, an
        entry without a year, an empty catalogue, a K that is not an int >= 1.
    """
    ks = _check_ks(ks)
    if not isinstance(compress_ranks, bool):
        raise TypeError(f"compress_ranks must be a bool, got {type(compress_ranks).__name__}")
    if ndcg_normalizer not in _NORMALIZERS:
        raise ValueError(f"ndcg_normalizer must be one of {_NORMALIZERS}, got {ndcg_normalizer!r}")
    if not isinstance(year_tolerance, int) or isinstance(year_tolerance, bool) or year_tolerance < 0:
        raise ValueError(f"year_tolerance must be an int >= 0, got {year_tolerance!r}")
    _check_batch(completions, "completions")
    num_samples = len(completions)
    if num_samples == 0:
        raise ValueError("completions is empty: there is nothing to average over")
    _check_batch(ground_truth, "ground_truth", num_samples)
    if seen is not None:
        _check_batch(seen, "seen", num_samples)
    in_catalogue, in_catalogue_tolerant = _catalogue_checks(catalog)

    max_k = ks[-1]
    discount = [1.0 / math.log2(r + 2) for r in range(max_k)]
    ideal = [0.0]  # ideal[m] = sum of the first m discounts
    for d in discount:
        ideal.append(ideal[-1] + d)
    standard = ndcg_normalizer == "standard"

    recall_rows = {k: [0.0] * num_samples for k in ks}
    ndcg_rows = {k: [0.0] * num_samples for k in ks}
    hit_rows = []
    catalogue_shares = 0.0
    lines = failures = 0
    for i in range(num_samples):
        entries = _entries(completions[i], f"completions[{i}]")
        gt_by_title, num_gt = _ground_truth(ground_truth[i], f"ground_truth[{i}]")
        seen_titles = _seen(None if seen is None else seen[i], f"seen[{i}]")

        # Diagnostics: parse failures over all slots; the catalogue ratio over the first max_k parsed items.
        parsed = [entry for entry in entries if entry is not None]
        lines += len(entries)
        failures += len(entries) - len(parsed)
        head = parsed[:max_k]
        if head:
            catalogue_shares += sum(in_catalogue_tolerant(title, year) for title, year in head) / len(head)

        # Rules 3-6: filter, rank (compressed or by slot), each ground-truth entry takes its first match.
        hit_ranks = []
        kept = 0
        for slot, entry in enumerate(entries):
            if entry is None:
                continue
            title, year = entry
            if title in seen_titles or not in_catalogue(title, year):
                continue
            rank = kept if compress_ranks else slot
            kept += 1
            hit = False
            for candidate in gt_by_title.get(title, ()):
                if not candidate[1] and abs(candidate[0] - year) <= year_tolerance:
                    candidate[1] = 1
                    hit = True
            if hit:
                hit_ranks.append(rank)
        length = kept if compress_ranks else len(entries)

        row = [0.0] * max_k
        for rank in hit_ranks:
            if rank < max_k:
                row[rank] = 1.0
        hit_rows.append(row)
        # Rules 7-8, for each K; hit_ranks ascend.
        for k in ks:
            count, dcg = 0, 0.0
            for rank in hit_ranks:
                if rank >= k:
                    break
                count += 1
                dcg += discount[rank]
            recall_rows[k][i] = count / num_gt
            idcg = ideal[min(k, num_gt) if standard else min(k, num_gt, length)]
            ndcg_rows[k][i] = dcg / idcg if idcg > 0 else 0.0

    hits = torch.tensor(hit_rows, dtype=torch.float32).reshape(num_samples, max_k)
    return RankingMetrics(
        ks=ks,
        num_samples=num_samples,
        recall=MappingProxyType({k: math.fsum(recall_rows[k]) / num_samples for k in ks}),
        ndcg=MappingProxyType({k: math.fsum(ndcg_rows[k]) / num_samples for k in ks}),
        recall_per_sample=MappingProxyType({k: torch.tensor(recall_rows[k], dtype=torch.float64) for k in ks}),
        ndcg_per_sample=MappingProxyType({k: torch.tensor(ndcg_rows[k], dtype=torch.float64) for k in ks}),
        hits=hits,
        hit_rate_at_rank=hits.to(torch.float64).mean(0),
        in_catalog_rate=catalogue_shares / num_samples,
        parse_failure_rate=failures / lines if lines else 0.0,
        compress_ranks=compress_ranks,
        ndcg_normalizer=ndcg_normalizer,
        year_tolerance=year_tolerance,
    )
