"""Segmentation against a slow per-token loop (the authors' algorithm) and against ``split_items``."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from rankgrpo_kernels import line_table, newline_counts, segment_items, split_items

from ..helpers import TinyTokenizer

PIECES = ["A", "b", " ", "(1999)", "\n", "\n\n", ")\n", " \n", "\n\n\n", "x\ny", "\nz", "\r\n", "1."]
# Pieces with text only before their newlines: every item's text is then made of whole tokens.
LINE_PIECES = ["A", "b", " ", "(1999)", "\n", "\n\n", ")\n", " \n", "1.", "\t", "\r\n"]


def slow_segmentation(tokenizer, ids, valid, max_items, eos_id):
    """The authors' per-row, per-token loop with one decode per token over the valid tokens only (masked ones, a
    prompt before or padding after, are skipped), plus their EOS, item counts and termination."""
    item_ids, eos_mask, emitted, terminated = [], [], [], []
    for row, row_valid in zip(ids.tolist(), valid.tolist()):
        positions = [t for t, v in enumerate(row_valid) if v]
        out, item = [-1] * len(row), 0
        for t in positions:
            out[t] = min(item, max_items)
            item += tokenizer.decode([row[t]], clean_up_tokenization_spaces=False).replace("\r\n", "\n").count("\n")
        first_eos = next((t for t in positions if row[t] == eos_id), None)
        eos_mask.append([t == first_eos for t in range(len(row))])
        terminated.append(first_eos is not None)
        natural = [sum(tokenizer.decode([row[s]]).count("\n") for s in positions if s < t) for t in positions]
        emitted.append(max(natural, default=-1) + 1)
        item_ids.append(out)
    return torch.tensor(item_ids), torch.tensor(eos_mask), torch.tensor(emitted), torch.tensor(terminated)


@st.composite
def token_rows(draw, pieces):
    """Rows whose completion is a window [start, start + length): a masked prefix (a prompt, which may hold EOS
    ids), the completion, masked padding (which may hold EOS ids)."""
    tokenizer = TinyTokenizer(pieces)
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 16))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, len(tokenizer) - 1), min_size=T, max_size=T),
                                     min_size=B, max_size=B)))
    starts = torch.tensor(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    lengths = torch.tensor(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    pos = torch.arange(T)
    valid = (pos >= starts[:, None]) & (pos < starts[:, None] + lengths[:, None])
    return tokenizer, ids, valid, draw(st.integers(1, 6))


@given(token_rows(PIECES))
def test_authors_mode_matches_slow_loop(rows):
    tokenizer, ids, valid, max_items = rows
    seg = segment_items(ids, valid, newline_counts(tokenizer), max_items, eos_token_id=tokenizer.eos_token_id)
    item_ids, eos_mask, emitted, terminated = slow_segmentation(tokenizer, ids, valid, max_items,
                                                                tokenizer.eos_token_id)
    assert torch.equal(seg.item_ids, item_ids)
    assert torch.equal(seg.eos_mask, eos_mask)
    assert torch.equal(seg.items_emitted, emitted)
    assert torch.equal(seg.overflow_mask, valid & (item_ids == max_items))
    assert torch.equal(seg.content_mask, valid & (item_ids < max_items) & ~eos_mask)
    assert torch.equal(seg.terminated, terminated)


@given(token_rows(LINE_PIECES))
def test_aligned_mode_matches_split_items(rows):
    tokenizer, ids, valid, _ = rows
    is_eos = (ids == tokenizer.eos_token_id) & valid
    valid &= is_eos.long().cumsum(1) - is_eos.long() == 0  # as trainers mask: up to and including the first EOS
    max_items = ids.shape[1] + 1  # no overflow here: every item is compared with its line
    seg = segment_items(ids, valid, line_table(tokenizer), max_items, eos_token_id=tokenizer.eos_token_id,
                        skip_blank_lines=True)
    for b in range(ids.shape[0]):
        positions = [t for t, v in enumerate(valid[b].tolist()) if v]
        row = [ids[b, t].item() for t in positions]
        eos_at = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        text = tokenizer.decode(row[:eos_at])
        items = split_items(text)
        assert seg.items_emitted[b].item() == len(items)
        assert seg.terminated[b].item() == (eos_at < len(row))
        for k, expected in enumerate(items):
            tokens = [i for i, item in zip(ids[b].tolist(), seg.item_ids[b].tolist())
                      if item == k and i != tokenizer.eos_token_id]
            assert tokenizer.decode(tokens).strip() == expected
        if eos_at < len(row):  # the EOS joins the last item, or item 0 of an empty list
            assert seg.eos_mask[b].nonzero().flatten().tolist() == [positions[eos_at]]
            assert seg.item_ids[b, positions[eos_at]].item() == max(len(items) - 1, 0)
        else:
            assert not seg.eos_mask[b].any()


def test_hand_written_authors_mode():
    tok = TinyTokenizer(["A", "\n", "\n\n", ")\n", "B"])
    e = tok.eos_token_id
    ids = torch.tensor([tok.encode(["A", "\n", "\n\n", "B", ")\n", "A", "<eos>", "B"]),
                        tok.encode(["A", "\n", "B", "\n", "<eos>", "<eos>", "<eos>", "<eos>"])])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]]).bool()
    seg = segment_items(ids, valid, newline_counts(tok), 3, eos_token_id=e)
    assert seg.item_ids.tolist() == [[0, 0, 1, 3, 3, 3, 3, -1], [0, 0, 1, 1, 2, -1, -1, -1]]
    assert seg.overflow_mask[0].tolist() == [False, False, False, True, True, True, True, False]
    assert seg.eos_mask.nonzero().tolist() == [[0, 6], [1, 4]]
    assert seg.items_emitted.tolist() == [5, 3]  # natural ids, EOS included, as the authors count
    assert seg.content_mask[1].tolist() == [True, True, True, True, False, False, False, False]
    assert seg.item_ids_for("rank")[1].tolist() == [0, 0, 1, 1, -1, -1, -1, -1]


def test_hand_written_aligned_mode():
    tok = TinyTokenizer(["Intro:", "\n", "\n\n", " ", "A", ")\n", "B"])
    words = ["Intro:", "\n\n", "A", ")\n", " ", "\n", "B", "\n", "\n", "<eos>"]
    ids = torch.tensor([tok.encode(words)])
    seg = segment_items(ids, torch.ones_like(ids, dtype=torch.bool), line_table(tok), 2,
                        eos_token_id=tok.eos_token_id, skip_blank_lines=True)
    # Blank lines and the trailing newline stay with the item before them; "B" is item 2 -> overflow bin 2.
    assert seg.item_ids.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert seg.items_emitted.tolist() == [3]
    assert split_items("Intro:\n\nA)\n \nB\n\n") == ["Intro:", "A)", "B"]
    assert split_items("a\n\nb\n", skip_blank_lines=False) == ["a", "", "b"]


def test_line_table_columns():
    tok = TinyTokenizer(["a\n\nb\nc", "\n", " x", "\n \n", "y\n"])
    table = line_table(tok)
    assert table[:5].tolist() == [[3, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1], [2, 0, 0, 0], [1, 1, 0, 0]]
    assert newline_counts(tok).tolist() == [3, 1, 0, 2, 1, 0]
    assert line_table(tok) is table  # built once per tokenizer
    assert newline_counts(tok, vocab_size=10).shape == (10,)


def test_segmentation_traces_without_graph_breaks():
    """No Python loop over tokens and no .item(): dynamo captures the whole function in one graph."""
    tok = TinyTokenizer(["A", "\n", "\n\n", " "])
    table = line_table(tok)
    ids = torch.randint(0, len(tok), (3, 9))
    valid = torch.ones(3, 9, dtype=torch.bool)
    for skip in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(segment_items, backend="eager", fullgraph=True)
        got = compiled(ids, valid, table, 2, eos_token_id=tok.eos_token_id, skip_blank_lines=skip)
        want = segment_items(ids, valid, table, 2, eos_token_id=tok.eos_token_id, skip_blank_lines=skip)
        assert torch.equal(got.item_ids, want.item_ids)
