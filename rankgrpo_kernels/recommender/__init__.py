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

Modules, one job each:

parsing.py          ``Title (Year)`` lines, title keys (``normalize_title``), the years of entries
catalog.py          ``Catalog``: the titles and years a platform holds, and the year tolerance
hits.py             ``rank_hits`` (the rules above) and ``item_hits`` (plain string match)
reward_function.py  ``make_rank_hit_reward``: ``rank_hits`` as a TRL-style reward function
evaluation.py       ``evaluate_lists``: the paper's Recall@K and NDCG@K under the authors' evaluation protocol (ranks
                    compressed, exact titles; not the rules above), ``RankingMetrics``
authors_parsing.py  ``parse_rec_line`` and ``parse_completion``: the authors' line parser that protocol uses
"""

from .catalog import Catalog
from .authors_parsing import parse_completion, parse_rec_line
from .evaluation import RankingMetrics, evaluate_lists
from .hits import item_hits, rank_hits
from .parsing import normalize_title, parse_item
from .reward_function import make_rank_hit_reward

__all__ = [
    "Catalog",
    "RankingMetrics",
    "evaluate_lists",
    "item_hits",
    "make_rank_hit_reward",
    "normalize_title",
    "parse_completion",
    "parse_item",
    "parse_rec_line",
    "rank_hits",
]
