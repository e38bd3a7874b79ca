"""Catalogue hits: each rule by hand, file loading, bad input, and hypothesis-drawn lists whose hit at rank k must
belong to the k-th item that ``segment_items`` finds in the tokens of the completion."""

from __future__ import annotations

import json
import string

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankgrpo_kernels import line_table, newline_counts, segment_items, split_items
from rankgrpo_kernels.recommender import Catalog, make_rank_hit_reward, normalize_title, parse_item, rank_hits

from ..helpers import TinyTokenizer

TOLERANCE = 2  # the default year tolerance


class GreedyTokenizer(TinyTokenizer):
    """A TinyTokenizer that also tokenises text: the longest piece that matches at each position wins."""

    def __init__(self, pieces, eos="<eos>"):
        super().__init__(pieces, eos)
        self.longest = max(len(p) for p in self.pieces)

    def tokenize(self, text):
        ids, at = [], 0
        while at < len(text):
            for size in range(min(self.longest, len(text) - at), 0, -1):
                piece_id = self.index.get(text[at : at + size])
                if piece_id is not None and piece_id != self.eos_token_id:
                    break
            else:
                raise ValueError(f"no token for {text[at]!r}")
            ids.append(piece_id)
            at += size
        return ids


# Single characters make any drawn text tokenisable; the newline pieces (all with their text before the newline,
# like real BPE merges such as ")\n") are the ones item boundaries hinge on.
TOKENIZER = GreedyTokenizer(
    list(string.ascii_letters + string.digits + " \t.,:!?()-*_\"'•")
    + ["\n", "\n\n", "\n\n\n", ")\n", " \n", " (", "**", "(19", "(20", "1.", "Here", " are"]
)

CATALOG = Catalog(
    [("Heat", 1995), ("Dune", 1984), ("Dune", 2021), ("The Matrix", "1999"), ("Alien", 1979), ("X", 2000)]
)


def hits_of(text, ground_truth, seen=(), rec_num=6, catalog=CATALOG, **kwargs):
    return rank_hits([text], [ground_truth], [list(seen)], catalog, rec_num, **kwargs)[0].tolist()


# ---------------------------------------------------------------- parsing and normalisation


@pytest.mark.parametrize(
    "line, expected",
    [
        ("Heat (1995)", ("Heat", 1995)),
        ("  Heat   (1995)  ", ("Heat", 1995)),
        ("Heat(1995)", ("Heat", 1995)),
        ("1. Heat (1995)", ("Heat", 1995)),
        ("12) Heat (1995)", ("Heat", 1995)),
        ("- Heat (1995)", ("Heat", 1995)),
        ("* Heat (1995)", ("Heat", 1995)),
        ("• Heat (1995)", ("Heat", 1995)),
        ("**Heat** (1995)", ("Heat", 1995)),
        ("*Heat (1995)*", ("Heat", 1995)),
        ("_Heat_ (1995)", ("Heat", 1995)),
        ('"Heat" (1995)', ("Heat", 1995)),
        ("“Heat” (1995)", ("Heat", 1995)),
        ('2) **"Heat"** (1995)', ("Heat", 1995)),
        ("- 3. *'The   Matrix'* (1999)", ("The Matrix", 1999)),
        ("1. 1917 (2019)", ("1917", 2019)),
        ("2001: A Space Odyssey (1968)", ("2001: A Space Odyssey", 1968)),
        ("M*A*S*H (1970)", ("M*A*S*H", 1970)),
        ("'71 (2014)", ("'71", 2014)),
        ("Dune (Part Two) (2024)", ("Dune (Part Two)", 2024)),
        ("Here are some movies:", None),
        ("Heat", None),
        ("Heat (95)", None),
        ("Heat 1995", None),
        ("Heat (1995) - a heist film", None),
        ("(1995)", None),
        ("** (1995)", None),
        ("", None),
    ],
)
def test_parse_item(line, expected):
    assert parse_item(line) == expected


def test_parse_item_without_cleaning_keeps_the_decoration():
    assert parse_item("1. Heat (1995)", clean=False) == ("1. Heat", 1995)
    assert parse_item("**Heat** (1995)", clean=False) == ("**Heat**", 1995)
    assert parse_item(" Heat  (1995) ", clean=False) == ("Heat", 1995)


def test_normalize_title():
    assert normalize_title("  The\tMATRIX  \n Reloaded ") == "the matrix reloaded"
    assert normalize_title("Straße") == normalize_title("STRASSE")  # case-folding, not lower()


# ---------------------------------------------------------------- the catalogue


def test_catalog_lookups():
    assert len(CATALOG) == 6
    assert CATALOG.years(" the  MATRIX ") == {1999}
    assert CATALOG.years("Dune") == {1984, 2021}
    assert CATALOG.years("Nope") == frozenset()
    assert ("heat", 1997) in CATALOG and ("heat", 1993) in CATALOG
    assert ("heat", 1998) not in CATALOG and ("Nope", 1995) not in CATALOG
    exact = Catalog([("Heat", 1995)], year_tolerance=0)
    assert exact.contains("Heat", 1995) and not exact.contains("Heat", 1996)
    assert Catalog([{"title": "Heat", "year": "1995"}]).years("heat") == {1995}


def test_catalog_from_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text('movie_id,title,year\n1,Heat,1995\n2,"Dune, Part One",2021\n', encoding="utf-8")
    from_csv = Catalog.from_csv(csv_path, year_tolerance=1)
    assert from_csv.years("dune, part one") == {2021} and from_csv.year_tolerance == 1
    assert len(from_csv) == 2

    renamed = tmp_path / "renamed.csv"
    renamed.write_text("name,released\nHeat,1995\n", encoding="utf-8")
    assert Catalog.from_csv(renamed, title_column="name", year_column="released").years("Heat") == {1995}

    jsonl_path = tmp_path / "catalog.jsonl"
    rows = [{"title": "Heat", "year": 1995}, {"title": "Alien", "year": "1979", "genre": "sf"}]
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    from_jsonl = Catalog.from_jsonl(jsonl_path)
    assert from_jsonl.years("alien") == {1979} and len(from_jsonl) == 2


def test_catalog_bad_input(tmp_path):
    with pytest.raises(ValueError, match="year_tolerance"):
        Catalog([("Heat", 1995)], year_tolerance=-1)
    with pytest.raises(ValueError, match=r"items\[1\].*year"):
        Catalog([("Heat", 1995), ("Dune", "n/a")])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        Catalog(["Heat (1995)"])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,year\nHeat,1995\n", encoding="utf-8")
    with pytest.raises(ValueError, match="title"):
        Catalog.from_csv(bad_csv)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"title": "Heat", "year": 1995}\n["Dune", 2021]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2:"):
        Catalog.from_jsonl(bad_jsonl)


# ---------------------------------------------------------------- one rule at a time


def test_a_hit_needs_a_catalogue_title():
    assert hits_of("Heat (1995)\nNope (2001)", [("Heat", 1995), ("Nope", 2001)]) == [1, 0, 0, 0, 0, 0]


def test_catalogue_year_within_tolerance():
    # Heat is in the catalogue as 1995: 1998 is too far for the catalogue even though the ground truth says 1998.
    assert hits_of("Heat (1998)", [("Heat", 1998)]) == [0] * 6
    assert hits_of("Heat (1997)", [("Heat", 1998)]) == [1, 0, 0, 0, 0, 0]


def test_seen_titles_score_zero_whatever_the_case_or_year():
    ground_truth = [("Heat", 1995), ("Alien", 1979)]
    assert hits_of("Heat (1995)\nAlien (1979)", ground_truth, seen=["  heat "]) == [0, 1, 0, 0, 0, 0]
    assert hits_of("Heat (1995)\nAlien (1979)", ground_truth, seen=[("ALIEN", 1900)]) == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("offset, hit", [(0, 1), (1, 1), (-2, 1), (2, 1), (3, 0), (-3, 0)])
def test_ground_truth_year_within_tolerance(offset, hit):
    catalog = Catalog([("Heat", 1990 + d) for d in range(11)])  # every year in the catalogue
    assert hits_of(f"Heat ({1995 + offset})", [("Heat", 1995)], catalog=catalog, rec_num=1) == [hit]


def test_year_tolerance_is_configurable():
    strict = Catalog([("Heat", 1995)], year_tolerance=0)
    loose = Catalog([("Heat", 1995)], year_tolerance=3)
    assert hits_of("Heat (1996)", [("Heat", 1995)], catalog=strict, rec_num=1) == [0]
    assert hits_of("Heat (1998)", [("Heat", 1995)], catalog=loose, rec_num=1) == [1]


def test_titles_match_after_normalisation():
    assert hits_of("the   MATRIX (1999)", [("The Matrix", "1999")], rec_num=1) == [1]
    assert hits_of("The Matrix Reloaded (2003)", [("The Matrix", 1999)], rec_num=1) == [0]


def test_ground_truth_items_pay_once_and_the_closest_year_is_used():
    assert hits_of("Heat (1995)\nHeat (1995)", [("Heat", 1995), ("Heat", 1995)]) == [1, 0, 0, 0, 0, 0]
    catalog = Catalog([("X", y) for y in range(1990, 2010)])
    # 2002 and 1998 are 4 years apart (not a repeat) and both within 2 of the one ground-truth 2000: it pays once.
    assert hits_of("X (2002)\nX (1998)", [("X", 2000)], catalog=catalog) == [1, 0, 0, 0, 0, 0]
    # 2002 takes the closer 2003, so 1999 (3 years from 2002: not a repeat) still finds 2000.
    assert hits_of("X (2002)\nX (1999)", [("X", 2000), ("X", 2003)], catalog=catalog) == [1, 1, 0, 0, 0, 0]
    # A tie takes the later year, as the authors' code does: 2001 takes 2002, leaving 2000 for 1998.
    assert hits_of("X (2001)\nX (1998)", [("X", 2000), ("X", 2002)], catalog=catalog) == [1, 1, 0, 0, 0, 0]


def test_repeats_score_zero_but_remakes_do_not_repeat():
    ground_truth = [("Heat", 1995), ("Heat", 1995), ("Dune", 1984), ("Dune", 2021)]
    assert hits_of("Heat (1995)\n**heat** (1996)\nHeat (1995)", ground_truth) == [1, 0, 0, 0, 0, 0]
    # A repeat of a miss is a repeat too.
    assert hits_of("Heat (1995)\nHeat (1995)", [("Heat", 1995)], seen=["Heat"]) == [0] * 6
    assert hits_of("Dune (1984)\nDune (2021)", ground_truth) == [1, 1, 0, 0, 0, 0]


def test_unparsable_lines_keep_their_rank():
    text = "Here are some movies:\nHeat (1995)\nA classic, trust me.\nAlien (1979)\nDune"
    assert hits_of(text, [("Heat", 1995), ("Alien", 1979)]) == [0, 1, 0, 1, 0, 0]


def test_blank_lines_follow_the_segmentation_mode():
    text = "Heat (1995)\n\n  \nAlien (1979)\n"
    ground_truth = [("Heat", 1995), ("Alien", 1979)]
    assert hits_of(text, ground_truth, rec_num=4) == [1, 1, 0, 0]
    assert hits_of(text, ground_truth, rec_num=4, skip_blank_lines=False) == [1, 0, 0, 1]


def test_cleaning_can_be_switched_off():
    assert hits_of("1. Heat (1995)\n**Alien** (1979)", [("Heat", 1995), ("Alien", 1979)], clean=False) == [0] * 6


def test_items_past_rec_num_are_ignored_and_missing_ranks_are_zero():
    ground_truth = [("Heat", 1995), ("Alien", 1979), ("Dune", 2021)]
    assert hits_of("Heat (1995)\nAlien (1979)\nDune (2021)", ground_truth, rec_num=2) == [1, 1]
    assert hits_of("Alien (1979)", ground_truth, rec_num=3) == [1, 0, 0]
    assert hits_of("", ground_truth, rec_num=2) == [0, 0]


def test_batch_shape_dtype_and_seen_none():
    hits = rank_hits(["Heat (1995)", "Alien (1979)\nHeat (1995)"], [[("Heat", 1995)]] * 2, None, CATALOG, 3)
    assert hits.dtype == torch.float32 and hits.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert rank_hits([], [], None, CATALOG, 4).shape == (0, 4)


# ---------------------------------------------------------------- the TRL-style reward function


def test_reward_function_plain_and_conversational():
    reward = make_rank_hit_reward(CATALOG, rec_num=3)
    assert reward.__name__ == "rank_hit_reward"  # TRL logs rewards under the function's name
    texts = ["Sure!\nHeat (1995)\nAlien (1979)", "Alien (1979)"]
    ground_truth = [[["Heat", "1995"], ["Alien", "1979"]], [{"title": "Alien", "year": 1979}]]
    conversational = [[{"role": "user", "content": "ignored"}, {"role": "assistant", "content": t}] for t in texts]
    extras = dict(completion_ids=[[1], [2]], trainer_state=None, log_metric=print)
    for completions in (texts, conversational):
        got = reward(prompts=["p", "p"], completions=completions, ground_truth=ground_truth, seen=[["Heat"], []],
                     **extras)
        assert got == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
        assert all(isinstance(r, list) and all(isinstance(x, float) for x in r) for r in got)
    assert reward(prompts=None, completions=texts, ground_truth=ground_truth) == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, error, name",
    [
        (dict(rec_num=0), ValueError, "rec_num"),
        (dict(rec_num=2.0), ValueError, "rec_num"),
        (dict(rec_num=True), ValueError, "rec_num"),
        (dict(completions="Heat (1995)"), TypeError, "completions"),
        (dict(completions=["Heat (1995)", 7]), TypeError, r"completions\[1\]"),
        (dict(ground_truth=[[("Heat", 1995)]]), ValueError, "ground_truth"),
        (dict(seen=[[]]), ValueError, "seen"),
        (dict(ground_truth=[[("Heat", 1995)], "Heat (1995)"]), TypeError, r"ground_truth\[1\]"),
        (dict(ground_truth=[[("Heat", 1995)], [("Heat", "soon")]]), ValueError, r"ground_truth\[1\]\[0\]"),
        (dict(ground_truth=[[("Heat", 1995)], ["Heat"]]), ValueError, r"ground_truth\[1\]\[0\]"),
        (dict(seen=[[], [3]]), ValueError, r"seen\[1\]\[0\]"),
        (dict(catalog={("Heat", 1995)}), TypeError, "catalog"),
    ],
)
def test_rank_hits_bad_input(changes, error, name):
    kwargs = dict(completions=["Heat (1995)", "x"], ground_truth=[[("Heat", 1995)], []], seen=[[], []],
                  catalog=CATALOG, rec_num=2)
    kwargs.update(changes)
    with pytest.raises(error, match=name):
        rank_hits(**kwargs)


def test_reward_function_bad_input():
    with pytest.raises(ValueError, match="rec_num"):
        make_rank_hit_reward(CATALOG, rec_num=0)
    with pytest.raises(TypeError, match="catalog"):
        make_rank_hit_reward([("Heat", 1995)], rec_num=2)
    reward = make_rank_hit_reward(CATALOG, rec_num=2)
    with pytest.raises(ValueError, match="ground_truth"):
        reward(prompts=["p"], completions=["Heat (1995)"])
    with pytest.raises(ValueError, match="prompts"):
        reward(prompts=["p", "q"], completions=["Heat (1995)"], ground_truth=[[]])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        reward(prompts=["p"], completions=[[{"role": "assistant", "content": None}]], ground_truth=[[]])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        reward(prompts=["p"], completions=[[]], ground_truth=[[]])


# ---------------------------------------------------------------- hits land on the tokens of their item

UNPARSABLE = ["Here are some movies:", "A classic, trust me!", "Top picks (for you)", "Heat (95)", "-", "**"]
STYLES = [
    "{title} ({year})",
    "{n}. {title} ({year})",
    "{n}) {title} ({year})",
    "- {title} ({year})",
    "* **{title}** ({year})",
    "• {title} ({year})",
    '"{title}" ({year})',
    "{n}. **{title} ({year})**",
]
TITLE_FORMS = [str, str.upper, str.lower, lambda t: t.replace(" ", "  ")]


def title_key(title):
    """The oracle's own title normalisation (drawn titles are ASCII, where lower() is case-folding)."""
    return " ".join(title.split()).lower()


@st.composite
def ranked_lists(draw):
    """A completion and its scoring data. Each line carries its intent: (title key, year) for a list item, None
    for a blank or unparsable line."""
    word = st.text(alphabet="abcdXYZ", min_size=1, max_size=5)
    titles = draw(st.lists(st.lists(word, min_size=1, max_size=3).map(" ".join), min_size=3, max_size=8,
                           unique_by=title_key))
    release = {t: draw(st.integers(1950, 2020)) for t in titles}
    # Mostly catalogue titles in the ground truth that the user has not seen, so that hits are common.
    likely, unlikely = st.sampled_from([True, True, True, False]), st.sampled_from([False, False, False, True])
    in_catalog = [t for t in titles if draw(likely)]
    seen = [t for t in titles if draw(unlikely)]
    # Up to two ground-truth items per title, a year or so apart, so that the closest-year choice matters.
    ground_truth = []
    for t in titles:
        if draw(likely):
            ground_truth += [(t, release[t] + d) for d in draw(st.lists(st.integers(-1, 1), min_size=1, max_size=2))]

    list_item = st.tuples(st.sampled_from(titles), st.integers(-3, 3), st.sampled_from(STYLES),
                          st.sampled_from(TITLE_FORMS), st.integers(1, 20))
    lines = [(text, None) for text in draw(st.sampled_from([[], ["Here are some movies:"], ["Sure!", ""]]))]
    kinds = st.sampled_from(["item", "item", "item", "blank", "unparsable"])
    for kind in draw(st.lists(kinds, min_size=2, max_size=12)):
        if kind == "item":
            title, offset, style, form, n = draw(list_item)
            year = release[title] + offset
            lines.append((style.format(title=form(title), year=year, n=n), (title_key(title), year)))
        elif kind == "blank":
            lines.append((draw(st.sampled_from(["", " ", "\t"])), None))
        else:
            lines.append((draw(st.sampled_from(UNPARSABLE) | st.sampled_from(titles)), None))
    # Every line ends with a newline, except (sometimes) a last line with text; or a blank line closes the list.
    ending = draw(st.sampled_from(["newline", "none", "blank line"]))
    if ending == "blank line":
        lines.append(("", None))
    text = "".join(line + "\n" for line, _ in lines)
    if ending == "none" and lines and lines[-1][0].strip():
        text = text[:-1]
    return dict(
        text=text,
        lines=lines,
        catalog=Catalog([(t, release[t]) for t in in_catalog]),
        catalog_entries=[(title_key(t), release[t]) for t in in_catalog],
        ground_truth=[(t.upper(), year) for t, year in ground_truth],
        seen=[f" {t} " for t in seen],
        rec_num=draw(st.integers(1, 8)),
        skip_blank_lines=draw(st.booleans()),
    )


def expected_hits(intents, case):
    """The rules spelt out slowly over the intended items (independent of the module's parser)."""
    unused = [(title_key(t), y) for t, y in case["ground_truth"]]
    seen = {title_key(t) for t in case["seen"]}
    earlier, hits = [], [0.0] * case["rec_num"]
    for rank, intent in enumerate(intents[: case["rec_num"]]):
        if intent is None:
            continue
        title, year = intent
        repeat = any(t == title and abs(y - year) <= TOLERANCE for t, y in earlier)
        earlier.append(intent)
        in_catalog = any(t == title and abs(y - year) <= TOLERANCE for t, y in case["catalog_entries"])
        matches = [(t, y) for t, y in unused if t == title and abs(y - year) <= TOLERANCE]
        if in_catalog and title not in seen and not repeat and matches:
            unused.remove(min(matches, key=lambda g: (abs(g[1] - year), -g[1])))
            hits[rank] = 1.0
    return hits


def token_items(text, rec_num, skip_blank_lines):
    """The stripped text of each item k < rec_num as ``segment_items`` cuts the greedy tokens (EOS left out)."""
    ids = TOKENIZER.tokenize(text) + [TOKENIZER.eos_token_id]
    table = line_table(TOKENIZER) if skip_blank_lines else newline_counts(TOKENIZER)
    seg = segment_items(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), table, rec_num,
                        eos_token_id=TOKENIZER.eos_token_id, skip_blank_lines=skip_blank_lines)
    owners = seg.item_ids[0, :-1].tolist()
    return [TOKENIZER.decode([i for i, k in zip(ids, owners) if k == rank]).strip() for rank in range(rec_num)]


@given(ranked_lists())
def test_hit_at_rank_k_belongs_to_the_kth_token_item(case):
    text, rec_num, skip = case["text"], case["rec_num"], case["skip_blank_lines"]
    hits = rank_hits([text], [case["ground_truth"]], [case["seen"]], case["catalog"], rec_num, skip)[0].tolist()

    items = [(line, intent) for line, intent in case["lines"] if line.strip() or not skip]
    assert hits == expected_hits([intent for _, intent in items], case)

    # Item k of the tokens is the k-th line of the list, and a hit at rank k is a hit of the text of token item k:
    # every reward lands on the tokens of the line that earned it.
    from_tokens = token_items(text, rec_num, skip)
    assert from_tokens == [line.strip() for line, _ in items[:rec_num]] + [""] * (rec_num - len(items))
    assert split_items(text, skip)[:rec_num] == [line.strip() if skip else line for line, _ in items[:rec_num]]
    for rank, hit in enumerate(hits):
        alone = rank_hits([from_tokens[rank]], [case["ground_truth"]], [case["seen"]], case["catalog"], 1)
        assert alone.item() >= hit  # a hit is a hit on its own tokens' text (earlier items only take hits away)
