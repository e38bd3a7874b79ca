"""Recall@K and NDCG@K under the authors' evaluation protocol: hand-worked lists, a direct loop over the rules,
properties, bad input and speed."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankgrpo_kernels.recommender import Catalog, RankingMetrics, evaluate_lists, parse_completion, parse_rec_line

L3 = 1 / math.log2(3)  # discount of rank 1 (0-based)
L4 = 1 / math.log2(4)  # rank 2: 0.5
L5 = 1 / math.log2(5)  # rank 3
L7 = 1 / math.log2(7)  # rank 5
IDCG2 = 1 + L3  # ideal DCG of two hits: 1.63093

PAIRS = [("Heat", 1995), ("Alien", 1979), ("Jaws", 1975), ("Up", 2009), ("Se7en", 1995), ("Her", 2013)]
CATALOG = Catalog(PAIRS)


def scores(completions, ground_truth, seen=None, catalog=CATALOG, ks=(1, 2, 3, 5, 10), **kw):
    """Per-sample (recall, ndcg) of the first sample at each K."""
    result = evaluate_lists(completions, ground_truth, seen, catalog, ks, **kw)
    return {k: (result.recall_per_sample[k][0].item(), result.ndcg_per_sample[k][0].item()) for k in result.ks}


# --- the parser --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "line, expected",
    [
        ("1. **Heat** (1995)", ("Heat", 1995)),  # numbering, then emphasis, peeled in turns
        ('2) "Alien" (1979)', ("Alien", 1979)),  # quotes around the title
        ('"Heat (1995)"', ("Heat", 1995)),  # quotes around the line
        ("- Up (2009) - a Pixar film", ("Up", 2009)),  # a prefix match: text after the year is allowed
        ("### Jaws (1975)", ("Jaws", 1975)),  # a markdown header
        ("10 - Her (2013)", ("Her", 2013)),
        ("*Heat (1995)*", ("Heat", 1995)),
        ("_Se7en_ (1995)", ("Se7en", 1995)),
        ("2.  Up   (2009)", ("Up", 2009)),  # whitespace collapsed
        ("Amélie (Le Fabuleux Destin) (2001)", ("Amélie", 2001)),  # parenthesised parts leave the title
        ("Heat (1995) (1996)", ("Heat", 1995)),  # the first year
        ("1. M*A*S*H (1970)", ("M*A*S*H", 1970)),  # inner characters stay
        ("#Alive (2020)", ("Alive", 2020)),  # '#' peeled, as the authors do
        ("1.Heat (1995)", ("1.Heat", 1995)),  # numbering needs a space after it
        ("“Heat” (1995)", ("“Heat”", 1995)),  # curly quotes are not the authors' quotes
        ("Heat(1995)", None),  # the space before the parenthesis is required
        ("Heat 1995", None),
        ("Heat", None),
        ("Here are some films you may like:", None),
    ],
)
def test_parse_rec_line(line, expected):
    assert parse_rec_line(line) == expected


def test_parse_completion_collapses_blank_lines():
    text = "Sure!\n\n1. Heat (1995)\n   \n\n2. Alien (1979)\n\n"
    assert parse_completion(text) == [None, ("Heat", 1995), ("Alien", 1979)]


# --- hand-worked lists -------------------------------------------------------------------------------------------

EXAMPLE = """Here are some films you might like:
1. Jaws (1975)
2. Made Up Movie (2020)
3. **Heat** (1995)
4. Up (2009)
5. Alien (1979)"""
EXAMPLE_GT = [[("Heat", 1995), ("Alien", 1979)]]


def test_docstring_example_compressed():
    # Preamble (no parse), Jaws (seen), Made Up Movie (not in catalogue) dropped: kept Heat, Up, Alien, n = 3.
    # Hits at ranks 0 and 2. Recall@K = hits in top K / |gt| = hits / 2.
    # NDCG: m = min(K, 2, 3); DCG@3 = 1 + 1/log2(4) = 1.5, IDCG (m = 2) = 1 + 1/log2(3) = 1.63093.
    got = scores([EXAMPLE], EXAMPLE_GT, [["Jaws"]])
    assert got[1] == pytest.approx((1 / 2, 1 / 1))  # m = 1
    assert got[2] == pytest.approx((1 / 2, 1 / IDCG2))
    assert got[3] == pytest.approx((2 / 2, (1 + L4) / IDCG2))
    assert got[5] == pytest.approx((1.0, 1.5 / 1.6309297535714575))
    assert got[5][1] == pytest.approx(0.91972, abs=1e-5)


def test_docstring_example_without_compression():
    # Six slots, hits in place at slots 3 (Heat) and 5 (Alien); n = 6, m = min(K, 2, 6).
    got = scores([EXAMPLE], EXAMPLE_GT, [["Jaws"]], compress_ranks=False)
    assert got[3] == pytest.approx((0.0, 0.0))
    assert got[5] == pytest.approx((1 / 2, L5 / IDCG2))  # 0.43068 / 1.63093 = 0.26407
    assert got[10] == pytest.approx((2 / 2, (L5 + L7) / IDCG2))  # 0.78689 / 1.63093 = 0.48248
    assert got[5][1] == pytest.approx(0.26407, abs=1e-5)
    assert got[10][1] == pytest.approx(0.48248, abs=1e-5)


def test_blank_lines_are_not_ranks():
    text = "Heat (1995)\n\n\n   \nAlien (1979)\n"
    for compress in (True, False):
        got = scores([text], EXAMPLE_GT, compress_ranks=compress)
        assert got[1] == pytest.approx((1 / 2, 1.0))  # m = min(1, 2, 2) = 1
        assert got[2] == pytest.approx((1.0, (1 + L3) / IDCG2))


def test_repeated_title_counts_once_and_keeps_its_rank():
    # Heat, Heat, Alien: the repeat passes the filters, keeps rank 1 and scores 0. Hits at 0 and 2, n = 3.
    got = scores(["Heat (1995)\nHeat (1995)\nAlien (1979)"], EXAMPLE_GT)
    assert got[2] == pytest.approx((1 / 2, 1 / IDCG2))  # 0.61315
    assert got[3] == pytest.approx((1.0, (1 + L4) / IDCG2))  # 0.91972


def test_two_ground_truth_entries_take_the_same_item():
    # Both ground-truth Heats (1995, 1996) take the first Heat within 2 years: one hit; |gt| = 2.
    catalog = Catalog([*PAIRS, ("Heat", 1996)])
    got = scores(["Heat (1995)\nHeat (1996)"], [[("Heat", 1995), ("Heat", 1996)]], catalog=catalog)
    assert got[2] == pytest.approx((1 / 2, 1 / IDCG2))  # the second Heat is no hit


def test_the_list_length_caps_the_ideal():
    # Heat (1996) is not in the catalogue with that exact year: dropped, n = 1. One hit of |gt| = 2.
    gt = [[("Heat", 1995), ("Heat", 1996)]]
    got = scores(["Heat (1995)\nHeat (1996)"], gt)
    assert got[2] == pytest.approx((1 / 2, 1.0))  # authors: m = min(2, 2, 1) = 1, IDCG = 1
    got = scores(["Heat (1995)\nHeat (1996)"], gt, ndcg_normalizer="standard")
    assert got[2] == pytest.approx((1 / 2, 1 / IDCG2))  # standard: m = min(2, 2) = 2


def test_fewer_items_than_k():
    gt = [[("Heat", 1995), ("Alien", 1979), ("Up", 2009)]]
    got = scores(["Heat (1995)"], gt)
    assert got[5] == pytest.approx((1 / 3, 1.0))  # m = min(5, 3, 1) = 1
    got = scores(["Heat (1995)"], gt, ndcg_normalizer="standard")
    assert got[5] == pytest.approx((1 / 3, 1 / (1 + L3 + L4)))  # 1 / 2.13093 = 0.46928


def test_year_tolerance():
    # The catalogue holds Heat 1992, 1993 and 1997 exactly; the ground truth is Heat 1995.
    catalog = Catalog([("Heat", 1992), ("Heat", 1993), ("Heat", 1997)])
    gt = [[("Heat", 1995)]]
    got = scores(["Heat (1992)\nHeat (1997)"], gt, catalog=catalog)  # 3 off: miss; 2 off: hit at rank 1
    assert got[1] == pytest.approx((0.0, 0.0))
    assert got[2] == pytest.approx((1.0, L3 / 1.0))  # m = min(2, 1, 2) = 1: 0.63093
    got = scores(["Heat (1993)"], gt, catalog=catalog)  # 2 off the other way: hit
    assert got[1] == pytest.approx((1.0, 1.0))
    # Heat (1996) is within 1 of the ground truth, but the catalogue check wants the exact year: dropped.
    got = scores(["Heat (1996)\nHeat (1997)"], gt, catalog=catalog)
    assert got[1] == pytest.approx((1.0, 1.0))
    got = scores(["Heat (1993)"], gt, catalog=catalog, year_tolerance=0)  # in the catalogue, 2 off: miss
    assert got[1] == pytest.approx((0.0, 0.0))


def test_seen_items_are_dropped_by_exact_title():
    text = "Jaws (1975)\nHeat (1995)\njaws (1975)"
    gt = [[("Heat", 1995)]]
    # Seen "Jaws" (a title) or ("Jaws", 1960) (the year plays no part): Jaws dropped, Heat moves to rank 0.
    for seen in (["Jaws"], [("Jaws", 1960)], [{"title": "Jaws", "year": 1960}]):
        assert scores([text], gt, [seen])[1] == pytest.approx((1.0, 1.0))
    # Seen "jaws" drops only the third line: "Jaws" stays at rank 0 (no hit), Heat is at rank 1.
    assert scores([text], gt, [["jaws"]])[1] == pytest.approx((0.0, 0.0))
    # Nothing seen: Jaws, Heat, jaws (the Catalog matches it case-folded) all stay; Heat at rank 1, n = 3.
    assert scores([text], gt, None)[2] == pytest.approx((1.0, L3))  # m = min(2, 1, 3) = 1


def test_catalogue_as_pairs_is_exact_and_case_sensitive():
    text = "heat (1995)\nAlien (1979)"
    gt = [[("Heat", 1995), ("Alien", 1979)]]
    # A Catalog compares normalised titles: "heat" passes, is no hit ("heat" != "Heat"), and holds rank 0.
    assert scores([text], gt)[2] == pytest.approx((1 / 2, L3 / IDCG2))  # 0.38685
    # The authors' (title, year) set: "heat" is dropped, Alien moves to rank 0, n = 1.
    assert scores([text], gt, catalog=set(PAIRS))[1] == pytest.approx((1 / 2, 1.0))
    assert scores([text], gt, catalog=[[t, str(y)] for t, y in PAIRS])[2] == pytest.approx((1 / 2, 1.0))


def test_nothing_left_scores_zero():
    got = scores(["I cannot recommend anything.\nSorry (no year)"], EXAMPLE_GT)
    assert all(value == (0.0, 0.0) for value in got.values())


def test_parsed_lists_and_none_slots():
    entries = [None, ("Heat", "1995"), {"title": "Alien", "year": 1979}]
    assert scores([entries], EXAMPLE_GT)[2] == pytest.approx((1.0, 1.0))
    got = scores([entries], EXAMPLE_GT, compress_ranks=False)  # the None keeps slot 0; hits at 1 and 2, n = 3
    assert got[2] == pytest.approx((1 / 2, L3 / IDCG2))
    assert got[3] == pytest.approx((1.0, (L3 + L4) / IDCG2))


def test_rates_means_and_per_rank_hits():
    completions = ["Here you go:\nHeat (1995)\nFake Film (2001)\n", "Alien (1979)\nUp (2010)"]
    gt = [[("Heat", 1995)], [("Up", 2009), ("Alien", 1979)]]
    result = evaluate_lists(completions, gt, None, CATALOG, (5, 10))
    assert isinstance(result, RankingMetrics) and result.num_samples == 2 and result.ks == (5, 10)
    # Sample 0: Heat at rank 0, recall 1. Sample 1: Up (2010) not in the catalogue with that year; Alien at rank 0.
    assert result.recall_per_sample[5].tolist() == pytest.approx([1.0, 1 / 2])
    assert result.recall[5] == pytest.approx(0.75)
    assert result.ndcg[5] == pytest.approx(1.0)  # both lists keep one item, a hit: m = 1
    assert result.hits.shape == (2, 10) and result.hit_rate_at_rank.tolist() == pytest.approx([1.0] + [0.0] * 9)
    # Parse failures: 1 of 5 non-blank lines. In-catalogue (tolerance 2): sample 0 1/2, sample 1 2/2 -> 0.75.
    assert result.parse_failure_rate == pytest.approx(0.2)
    assert result.in_catalog_rate == pytest.approx(0.75)
    flat = result.as_dict()
    assert flat["recall@10"] == result.recall[10] and flat["in_catalog_rate"] == pytest.approx(0.75)
    uncompressed = evaluate_lists(completions, gt, None, CATALOG, (5, 10), compress_ranks=False)
    assert uncompressed.hit_rate_at_rank[:3].tolist() == pytest.approx([0.5, 0.5, 0.0])  # Heat at slot 1
    with pytest.raises(TypeError):
        result.recall[5] = 0.0
    with pytest.raises(AttributeError):
        result.num_samples = 3


def test_ks_are_sorted_and_deduplicated():
    result = evaluate_lists([EXAMPLE], EXAMPLE_GT, [["Jaws"]], CATALOG, [10, 5, 10])
    assert result.ks == (5, 10) and result.hits.shape == (1, 10)
    assert evaluate_lists([EXAMPLE], EXAMPLE_GT, None, CATALOG, 3).ks == (3,)


# --- a direct loop over the rules, and properties ----------------------------------------------------------------

TITLES = ["Heat", "Alien", "Up", "Jaws", "Se7en", "Her", "Zodiac", "Memento"]
PROPERTY_PAIRS = [(t, y) for n, t in enumerate(TITLES) for y in range(1990, 2001) if (n + y) % 3]
PROPERTY_CATALOG = Catalog(PROPERTY_PAIRS)
DECORATIONS = ["{}", "1. {}", "2) **{}**", "- {}", '"{}"', "### {}", "{} - a fine film"]
item = st.builds(lambda t, y, d: d.format(f"{t} ({y})"), st.sampled_from(TITLES), st.integers(1988, 2002),
                 st.sampled_from(DECORATIONS))
junk = st.sampled_from(["Here are my picks:", "", "  ", "Heat(1995)", "Alien", "Enjoy!"])
lines = st.lists(st.one_of(item, item, junk), max_size=14)
ground_truth_items = st.lists(st.tuples(st.sampled_from(TITLES), st.integers(1988, 2002)), min_size=1, max_size=6)
seen_titles = st.lists(st.sampled_from(TITLES + ["heat"]), max_size=2)
KS = (1, 2, 3, 5, 10, 20)


def by_the_rules(entries, gt, seen, k, compress, standard=False):
    """The rules of the module docstring written as plainly as possible."""
    keep = [e is not None and e[0] not in seen and e[1] in PROPERTY_CATALOG.years(e[0]) for e in entries]
    ranked = [e for e, kept in zip(entries, keep) if kept] if compress else [
        e if kept else None for e, kept in zip(entries, keep)]
    hits = [0] * len(ranked)
    for title, year in gt:
        for r, e in enumerate(ranked):
            if e is not None and e[0] == title and abs(e[1] - year) <= 2:
                hits[r] = 1
                break
    recall = sum(hits[:k]) / len(gt)
    dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits[:k]))
    m = min(k, len(gt)) if standard else min(k, len(gt), len(ranked))
    idcg = sum(1 / math.log2(r + 2) for r in range(m))
    return recall, dcg / idcg if idcg else 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(lines, ground_truth_items, seen_titles), min_size=1, max_size=4), st.booleans(),
       st.booleans())
def test_matches_the_rules_and_bounds(samples, compress, standard):
    completions = ["\n".join(ls) for ls, _, _ in samples]
    gts = [gt for _, gt, _ in samples]
    seens = [seen for _, _, seen in samples]
    normalizer = "standard" if standard else "authors"
    result = evaluate_lists(completions, gts, seens, PROPERTY_CATALOG, KS, compress_ranks=compress,
                            ndcg_normalizer=normalizer)
    for i, (text, gt, seen) in enumerate(zip(completions, gts, seens)):
        entries = parse_completion(text)
        for k in KS:
            recall, ndcg = result.recall_per_sample[k][i].item(), result.ndcg_per_sample[k][i].item()
            assert (recall, ndcg) == pytest.approx(by_the_rules(entries, gt, set(seen), k, compress, standard))
            assert 0.0 <= recall <= 1.0 and 0.0 <= ndcg <= 1.0 + 1e-12
    for k in KS:
        assert result.recall[k] == pytest.approx(result.recall_per_sample[k].mean().item())
        assert result.ndcg[k] == pytest.approx(result.ndcg_per_sample[k].mean().item())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(lines, ground_truth_items, seen_titles), min_size=1, max_size=4), st.booleans())
def test_without_compression_never_scores_higher(samples, standard):
    args = (["\n".join(ls) for ls, _, _ in samples], [gt for _, gt, _ in samples], [s for _, _, s in samples],
            PROPERTY_CATALOG, KS)
    normalizer = "standard" if standard else "authors"
    kept = evaluate_lists(*args, ndcg_normalizer=normalizer)
    slots = evaluate_lists(*args, compress_ranks=False, ndcg_normalizer=normalizer)
    for k in KS:
        assert bool((slots.recall_per_sample[k] <= kept.recall_per_sample[k] + 1e-12).all())
        assert bool((slots.ndcg_per_sample[k] <= kept.ndcg_per_sample[k] + 1e-12).all())


unique_titles = st.lists(st.from_regex(r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}", fullmatch=True), min_size=1,
                         max_size=12, unique=True)


@settings(max_examples=50, deadline=None)
@given(unique_titles, st.integers(1950, 2020), st.sampled_from(DECORATIONS), st.booleans())
def test_a_perfect_list_scores_one(titles, year, decoration, compress):
    gt = [(t, year + n % 5) for n, t in enumerate(titles)]
    text = "\n".join(decoration.format(f"{t} ({y})") for t, y in gt)
    result = evaluate_lists([text], [gt], [["some other film"]], Catalog(gt), KS, compress_ranks=compress)
    for k in KS:
        assert result.recall[k] == pytest.approx(min(k, len(gt)) / len(gt))  # 1 once K >= |gt|
        assert result.ndcg[k] == pytest.approx(1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(PROPERTY_PAIRS), min_size=20, max_size=20), lines, lines, ground_truth_items,
       st.sampled_from(KS))
def test_items_after_rank_k_change_nothing_at_k(head, middle, tail, gt, k):
    # The first K lines are items that pass every filter (in the catalogue, none seen), so ranks < K are fixed
    # whatever follows, and n >= K keeps the ideal at min(K, |gt|).
    base = "\n".join([*(f"{i + 1}. {t} ({y})" for i, (t, y) in enumerate(head[:k])), *middle])
    longer = base + "\n" + "\n".join(tail)
    for compress in (True, False):
        a = evaluate_lists([base], [gt], None, PROPERTY_CATALOG, (k,), compress_ranks=compress)
        b = evaluate_lists([longer], [gt], None, PROPERTY_CATALOG, (k,), compress_ranks=compress)
        assert (a.recall[k], a.ndcg[k]) == (b.recall[k], b.ndcg[k])
        assert torch.equal(a.hits, b.hits)


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ground_truth=[[("Heat",)], [("Alien", 1979)]]), ValueError, r"ground_truth\[0\]\[0\]"),
        (dict(ground_truth=[[{"title": "Heat"}], [("Alien", 1979)]]), ValueError, r"ground_truth\[0\]\[0\]"),
        (dict(ground_truth=[[("Heat", None)], [("Alien", 1979)]]), ValueError, r"ground_truth\[0\]\[0\]: the year"),
        (dict(ground_truth=[[("Heat", 1995)], []]), ValueError, r"ground_truth\[1\] is empty"),
        (dict(ground_truth=[[("Heat", 1995)]]), ValueError, r"ground_truth has 1 entries but there are 2"),
        (dict(ground_truth=[[("Heat", 1995)], "Heat (1995)"]), TypeError, r"ground_truth\[1\] must be a list"),
        (dict(seen=[["Jaws"]]), ValueError, r"seen has 1 entries"),
        (dict(seen=["Jaws", None]), TypeError, r"seen\[0\] must be a list"),
        (dict(catalog=Catalog([])), ValueError, "catalog is empty"),
        (dict(catalog=[]), ValueError, "catalog is empty"),
        (dict(catalog="Heat (1995)"), TypeError, "catalog must be a Catalog"),
        (dict(catalog=[("Heat",)]), ValueError, "catalog entry 0"),
        (dict(ks=(5, 0)), ValueError, r"ks must hold ints >= 1, got 0"),
        (dict(ks=(5.0,)), TypeError, "ks must hold ints"),
        (dict(ks=(True,)), TypeError, "ks must hold ints"),
        (dict(ks=()), ValueError, "ks is empty"),
        (dict(ks="5"), TypeError, "ks must be an int or a sequence"),
        (dict(completions=["Heat (1995)", b"Heat (1995)"]), TypeError, r"completions\[1\] must be a str"),
        (dict(completions=["Heat (1995)", 5]), TypeError, r"completions\[1\] must be a str"),
        (dict(completions=["Heat (1995)", [("Heat",)]]), ValueError, r"completions\[1\]\[0\]"),
        (dict(completions="Heat (1995)"), TypeError, "completions must be a list"),
        (dict(completions=[], ground_truth=[], seen=None), ValueError, "completions is empty"),
        (dict(compress_ranks="yes"), TypeError, "compress_ranks"),
        (dict(ndcg_normalizer="ideal"), ValueError, "ndcg_normalizer"),
        (dict(year_tolerance=-1), ValueError, "year_tolerance"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(completions=["Heat (1995)", "Alien (1979)"], ground_truth=[[("Heat", 1995)], [("Alien", 1979)]],
                seen=None, catalog=CATALOG)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        evaluate_lists(**args)


def test_parsers_refuse_non_strings():
    with pytest.raises(TypeError, match="line must be a str"):
        parse_rec_line(None)
    with pytest.raises(TypeError, match="completion must be a str"):
        parse_completion(["Heat (1995)"])


# --- speed -------------------------------------------------------------------------------------------------------

def test_ten_thousand_lists_of_twenty_in_seconds():
    rng = random.Random(0)
    titles = [f"Movie Title {n}" for n in range(5000)]
    catalog = Catalog((t, 1950 + n % 70) for n, t in enumerate(titles))
    completions, gts, seens = [], [], []
    for _ in range(10_000):
        picks = rng.sample(range(5000), 20)
        completions.append("Here are 20 films:\n"
                           + "\n".join(f"{j + 1}. **{titles[p]}** ({1950 + p % 70})" for j, p in enumerate(picks)))
        gts.append([(titles[p], 1950 + p % 70) for p in rng.sample(picks, 3)] + [(titles[rng.randrange(5000)], 2030)])
        seens.append([titles[p] for p in rng.sample(picks, 2)])
    start = time.perf_counter()
    result = evaluate_lists(completions, gts, seens, catalog)
    elapsed = time.perf_counter() - start
    assert result.num_samples == 10_000 and result.parse_failure_rate == pytest.approx(1 / 21)
    assert 0.0 < result.recall[5] < result.recall[20] <= 0.75  # one ground-truth item of four is never listed
    assert elapsed < 30.0, f"10,000 lists of 20 items took {elapsed:.1f} s"  # about 2.5 s on one core
