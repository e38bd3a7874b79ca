"""Only tokens inside the completion mask can be the EOS: the first EOS, ``terminated`` and everything built on them.

Two layouts put EOS ids outside the mask: an adapter that segments a window holding masked prompt tokens (OpenRLHF's
``sequences[:, -A:]``), whose chat template writes the EOS id (Qwen's ``<|im_end|>``, Llama-3's ``<|eot_id|>``);
and rows cut off at the length limit, padded with a pad id equal to the EOS id (TRL's ``pad_to_multiple_of``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rankgrpo_kernels import line_table, newline_counts, segment_items, token_advantages

from ..helpers import TinyTokenizer

MODES = [False, True]  # skip_blank_lines: the authors' segmentation, the aligned one
TOK = TinyTokenizer(["User:", " hi", "\n", "A", "B", "C", "<pad>"], eos="<eos>")
EOS = TOK.eos_token_id
SHAPING = dict(overflow_penalty=-0.1, end_of_list_bonus=0.1, early_stop_penalty=-0.1)


def _table(skip_blank_lines):
    return line_table(TOK) if skip_blank_lines else newline_counts(TOK)


def _row(prompt, completion, pad=0, pad_piece="<pad>"):
    """ids and mask of one row: masked prompt tokens, the completion, masked padding."""
    pieces = prompt + completion + [pad_piece] * pad
    mask = [False] * len(prompt) + [True] * len(completion) + [False] * pad
    return torch.tensor([TOK.encode(pieces)]), torch.tensor([mask])


# A chat-templated prompt (the EOS id closes the user turn) before a 2-item list with 3 ranks.
PROMPT = ["User:", " hi", "<eos>", "\n"]
TWO_ITEMS = ["A", "\n", "B", "\n", "<eos>"]


@pytest.mark.parametrize("skip_blank_lines", MODES)
def test_an_eos_in_the_masked_prompt_is_not_the_completions_eos(skip_blank_lines):
    ids, mask = _row(PROMPT, TWO_ITEMS)
    seg = segment_items(ids, mask, _table(skip_blank_lines), 3, eos_token_id=EOS, skip_blank_lines=skip_blank_lines)
    P = len(PROMPT)
    assert seg.eos_mask[0].nonzero().flatten().tolist() == [P + 4]  # the completion's EOS, not the prompt's
    assert seg.terminated.tolist() == [True]
    assert not seg.content_mask[0, P + 4]
    if skip_blank_lines:  # the EOS joins the last item: 2 items, as split_items counts them
        assert seg.item_ids[0].tolist() == [-1] * P + [0, 0, 1, 1, 1]
        assert seg.items_emitted.tolist() == [2]
    else:  # the authors' count: EOS gets the id after the last newline
        assert seg.item_ids[0].tolist() == [-1] * P + [0, 0, 1, 1, 2]
    # The same completion without the prompt window segments the same way.
    alone = segment_items(ids[:, P:], mask[:, P:], _table(skip_blank_lines), 3, eos_token_id=EOS,
                          skip_blank_lines=skip_blank_lines)
    for name in ("item_ids", "content_mask", "overflow_mask", "eos_mask"):
        assert torch.equal(getattr(seg, name)[:, P:], getattr(alone, name)), name
    assert torch.equal(seg.items_emitted, alone.items_emitted)
    assert torch.equal(seg.terminated, alone.terminated)


def test_the_eos_after_a_masked_prompt_eos_gets_the_early_stop_shaping():
    """Aligned mode, 2 items of 3: the EOS takes -0.1 (early stop), not rank 3's advantage, and the items their own."""
    ids, mask = _row(PROMPT, TWO_ITEMS)
    seg = segment_items(ids, mask, line_table(TOK), 3, eos_token_id=EOS, skip_blank_lines=True)
    rank_adv = torch.tensor([[0.5, -0.25, 2.0]])
    adv = token_advantages(rank_adv, seg, **SHAPING)
    P = len(PROMPT)
    assert adv[0].tolist() == pytest.approx([0.0] * P + [0.5, 0.5, -0.25, -0.25, -0.1])


def test_authors_mode_eos_after_a_masked_prompt_eos_gets_the_shaping():
    ids, mask = _row(PROMPT, ["A", "\n", "B", "<eos>"])
    seg = segment_items(ids, mask, newline_counts(TOK), 3, eos_token_id=EOS)
    adv = token_advantages(torch.tensor([[0.5, -0.25, 2.0]]), seg, **SHAPING)
    P = len(PROMPT)
    assert seg.items_emitted.tolist() == [2]
    assert adv[0].tolist() == pytest.approx([0.0] * P + [0.5, 0.5, -0.25, -0.1])


@pytest.mark.parametrize("skip_blank_lines", MODES)
def test_pad_equal_to_eos_after_a_truncated_row_is_not_a_termination(skip_blank_lines):
    """Rows cut off at the length limit (no EOS in the mask), padded with the EOS id: not terminated, no shaping."""
    full, full_mask = _row([], ["A", "\n", "B", "\n", "C"], pad=2, pad_piece="<eos>")   # 3 items of 3, cut off
    short, short_mask = _row([], ["A", "\n", "B"], pad=4, pad_piece="<eos>")            # 2 items of 3, cut off
    done, done_mask = _row([], ["A", "\n", "B", "<eos>"], pad=3, pad_piece="<eos>")     # 2 items, terminated
    ids, mask = torch.cat([full, short, done]), torch.cat([full_mask, short_mask, done_mask])
    seg = segment_items(ids, mask, _table(skip_blank_lines), 3, eos_token_id=EOS, skip_blank_lines=skip_blank_lines)
    assert seg.terminated.tolist() == [False, False, True]
    assert seg.eos_mask.nonzero().tolist() == [[2, 3]]
    adv = token_advantages(torch.tensor([[1.0, 2.0, 3.0]] * 3), seg, **SHAPING)
    assert adv[0].tolist() == pytest.approx([1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0])
    assert adv[1].tolist() == pytest.approx([1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    assert adv[2].tolist() == pytest.approx([1.0, 1.0, 2.0, -0.1, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("skip_blank_lines", MODES)
def test_masked_tokens_never_change_the_segmentation(skip_blank_lines):
    """Rewriting every masked token as EOS (prompt window and padding) leaves every output unchanged."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(TOK), (64, 12), generator=g)
    start = torch.randint(0, 6, (64, 1), generator=g)
    stop = start + torch.randint(0, 7, (64, 1), generator=g)
    pos = torch.arange(12)
    mask = (pos >= start) & (pos < stop)
    table = _table(skip_blank_lines)
    kwargs = dict(eos_token_id=EOS, skip_blank_lines=skip_blank_lines)
    want = segment_items(torch.where(mask, ids, TOK.index["<pad>"]), mask, table, 3, **kwargs)
    got = segment_items(torch.where(mask, ids, EOS), mask, table, 3, **kwargs)
    for name in ("item_ids", "content_mask", "overflow_mask", "eos_mask", "items_emitted", "terminated"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


# --- Through the TRL trainer: its items/* metrics on rows padded with pad == EOS ---------------------------------

REC_NUM = 4


@pytest.fixture(scope="module")
def pad_is_eos_trainer(tmp_path_factory):
    """The tiny recommender's RankGRPOTrainer with the tokenizer's pad set to its EOS, completions cut at 6 tokens
    and padded to a multiple of 8: every row is truncated and ends in 2 pad (= EOS) tokens outside its mask."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from integrations.tiny_recommender import build_tiny_recommender, hit_reward
    from rankgrpo_kernels.adapters.trl import RankGRPOConfig, RankGRPOTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("eos_masking")
    world = build_tiny_recommender(directory / "model", rec_num=REC_NUM, warm_steps=60)
    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    args = RankGRPOConfig(
        output_dir=str(directory / "run"), rec_num=REC_NUM, num_generations=4, per_device_train_batch_size=8,
        max_completion_length=6, pad_to_multiple_of=8, max_steps=1, learning_rate=1e-3, beta=0.0, seed=0,
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
    )
    trainer = RankGRPOTrainer(model=LlamaForCausalLM.from_pretrained(world.path), reward_funcs=hit_reward(REC_NUM),
                              args=args, train_dataset=Dataset.from_list(world.rows), processing_class=tokenizer)
    yield trainer, world
    torch.set_num_threads(threads)


def _last(trainer, name):
    return trainer._metrics["train"][f"items/{name}"][-1]


def test_trl_metrics_of_rows_cut_off_and_padded_with_eos(pad_is_eos_trainer):
    """Generation: lists cut at 6 tokens, padded to 8 with the EOS id; none terminated, so none stopped early."""
    trainer, world = pad_is_eos_trainer
    torch.manual_seed(0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [row for row in world.rows[::7][:2] for _ in range(trainer.num_generations)]
    output = trainer._generate_and_score_completions(rows)
    ids, mask = output["completion_ids"], output["completion_mask"].bool()
    eos = trainer.processing_class.eos_token_id
    assert ids.shape[1] == 8 and (ids[:, 6:] == eos).all() and not mask[:, 6:].any()  # the layout under test
    assert not (mask & (ids == eos)).any()  # every list was cut off before its EOS
    assert _last(trainer, "early_stop_ratio") == 0.0
    assert _last(trainer, "exact_ratio") == 0.0


def test_trl_exact_and_early_stop_ratios_count_only_eos_inside_the_mask(pad_is_eos_trainer):
    """Hand-made rows through the trainer's segmentation and metrics (aligned mode, N = 4)."""
    trainer, world = pad_is_eos_trainer
    tok = trainer.processing_class
    eos = tok.eos_token_id

    titles = world.rows[0]["relevant"]
    completions = [tok("\n".join(titles[:4]))["input_ids"],           # 4 items, cut off: not exact
                   tok("\n".join(titles[:2]))["input_ids"],           # 2 items, cut off: not an early stop
                   tok("\n".join(titles[:4]))["input_ids"] + [eos],   # exact
                   tok("\n".join(titles[:2]))["input_ids"] + [eos]]   # early stop
    width = max(map(len, completions)) + 3  # every row padded with at least 3 EOS ids outside its mask
    ids = torch.tensor([c + [eos] * (width - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    rewards = torch.zeros(4, REC_NUM)
    trainer._rank_fields(ids, mask, rewards, "train")
    assert _last(trainer, "emitted_mean") == 3.0
    assert _last(trainer, "exact_ratio") == 0.25
    assert _last(trainer, "early_stop_ratio") == 0.25


@pytest.mark.parametrize("skip_blank_lines", [False, True])
def test_a_list_of_eos_ids_ends_the_list_at_any_of_them(skip_blank_lines):
    """Llama-3 and Qwen2.5 declare several EOS ids (``generation_config.eos_token_id`` is a list)."""
    pad = TOK.encode(["<pad>"])[0]
    ids, mask = _row([], ["A", "\n", "B", "<pad>"])  # <pad> stands for a second EOS id here
    one = segment_items(ids, mask, _table(skip_blank_lines), 3, eos_token_id=EOS, skip_blank_lines=skip_blank_lines)
    both = segment_items(ids, mask, _table(skip_blank_lines), 3, eos_token_id=[EOS, pad],
                         skip_blank_lines=skip_blank_lines)
    assert not one.terminated.any() and both.terminated.all()
    assert both.eos_mask[0].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError, match="eos_token_id"):
        segment_items(ids, mask, _table(skip_blank_lines), 3, eos_token_id=[])
