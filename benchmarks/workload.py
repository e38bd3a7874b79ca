"""The realistic Rank-GRPO workload: what one TRL generation batch hands the loss, built the way the trainer builds it.

P prompts x G completions. Each completion is a ranked list of ``REC_NUM`` items, each item ``ITEM_TOKENS`` tokens
ending in a newline token; some completions stop early (fewer items), some overflow (more text after the last
rank: the overflow bin); then an EOS token. Rows are right-padded to the longest one, as TRL pads its completions
(``completion_mask`` 1 up to and including the EOS, 0 after).

Token ids live in a small tokenizer-like table (``BenchTokenizer``: content pieces without a newline, two
newline-ending pieces, EOS and PAD). The items come from the library's own segmentation of those ids
(``line_table`` + ``segment_items`` with the trainer's ``skip_blank_lines=True``), and the per-token advantages from
``rank_rewards`` -> ``rank_advantages`` -> ``token_advantages`` with length shaping, exactly as
``RankGRPOTrainer._rank_fields`` makes them.

Hits per (completion, rank) are Bernoulli draws from a rate shared by a prompt's completions: each prompt has a few
"hot" ranks, each with its own hit probability, and all other ranks are missed by every completion of the group, so
their advantage is exactly 0 (the group's rewards at that rank are all equal). ``hits_per_list`` sets the expected
hits per full list.

Three loss settings (``SETTINGS``), all bnpo with eps 0.06 / 0.08 (the released run):

* ``beta0``: beta = 0, on-policy (no old log-probs), no reference log-probs (TRL 1.16's default);
* ``beta1e-3``: beta = 1e-3 with reference log-probs and old log-probs near the policy (the released run);
* ``offpolicy``: beta = 0, old log-probs far enough from the policy that PPO clipping binds on a good share of
  items (several gradient steps per generation batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rankgrpo_kernels import line_table, rank_advantages, rank_rewards, segment_items, token_advantages

REC_NUM = 20
GENERATIONS = 8
HITS_PER_LIST = 0.6
ITEM_TOKENS = (6, 16)  # tokens per item, the newline token included
EARLY_STOP = 0.15  # share of completions that stop before REC_NUM items ...
EARLY_ITEMS = (8, REC_NUM - 1)  # ... after this many
OVERFLOW = 0.10  # share that write more after item REC_NUM ...
OVERFLOW_TOKENS = (8, 48)  # ... this many tokens (a few lines)
HOT_RANK_HIT_RATE = (0.02, 0.2)  # a hot rank's per-completion hit probability, uniform per (prompt, rank): hits
# spread over several ranks of a prompt, the denser (more conservative) end of what real recommenders see
EXPECTED_ROW = 255  # padded row length a batch of 8+ rows comes to on average (for the number of prompts)
SCALE_REWARDS = "group"  # RankGRPOConfig / TRL default
LOSS_TYPE = "bnpo"  # the released run
EPSILON_LOW, EPSILON_HIGH = 0.06, 0.08


@dataclass(frozen=True)
class Setting:
    """One loss setting of a workload: the loss's keyword settings and which log-probs the batch carries."""

    name: str
    beta: float
    old_logps: bool  # old (behaviour) log-probs given; otherwise on-policy (old = policy, detached)
    ref_logps: bool
    old_noise: float = 0.0  # per-token std of old - policy log-prob
    old_row_drift: float = 0.0  # per-row std of the same (drift shared by a completion's tokens)
    ref_noise: float = 0.1  # per-token std of ref - policy log-prob
    note: str = ""

    def loss_settings(self) -> dict:
        return dict(epsilon_low=EPSILON_LOW, epsilon_high=EPSILON_HIGH, beta=self.beta, loss_type=LOSS_TYPE)

    def describe(self) -> dict:
        return dict(asdict(self), **self.loss_settings())


SETTINGS = {
    "beta0": Setting("beta0", 0.0, old_logps=False, ref_logps=False,
                     note="beta 0, on-policy (no old log-probs), no reference log-probs: TRL 1.16's default"),
    "beta1e-3": Setting("beta1e-3", 1e-3, old_logps=True, ref_logps=True, old_noise=0.02,
                        note="beta 1e-3 with reference log-probs, old log-probs near the policy: the released run"),
    "offpolicy": Setting("offpolicy", 0.0, old_logps=True, ref_logps=False, old_noise=0.3, old_row_drift=0.05,
                         note="beta 0, old log-probs off the policy (several steps per generation batch): PPO "
                              "clipping binds on a share of items (clip_fraction)"),
}
# The dense workload's one setting: today's batch with the released settings (old and ref log-probs near the policy).
RELEASED = Setting("released", 1e-3, old_logps=True, ref_logps=True, old_noise=0.05, ref_noise=0.1,
                   note="bnpo, eps 0.06/0.08, beta 1e-3, old and ref log-probs near the policy")


class BenchTokenizer:
    """A vocabulary of ``vocab`` ids: content pieces (no newline), ``"\\n"``, ``")\\n"``, EOS and PAD at the top."""

    def __init__(self, vocab: int):
        if vocab < 16:
            raise ValueError(f"the workload needs a vocabulary of at least 16 ids, got {vocab}")
        self.vocab = vocab
        self.eos_token_id, self.pad_token_id = vocab - 1, vocab - 2
        self.newline_ids = (vocab - 3, vocab - 4)
        self.content_ids = vocab - 4  # ids [0, content_ids) are content pieces

    def __len__(self):
        return self.vocab

    def decode(self, ids, clean_up_tokenization_spaces=False, skip_special_tokens=False):
        pieces = {self.eos_token_id: "<|im_end|>", self.pad_token_id: "<|endoftext|>",
                  self.newline_ids[0]: "\n", self.newline_ids[1]: ")\n"}
        return "".join(pieces.get(int(i), f" w{int(i)}") for i in ids)


def prompts_for(tokens: int, generations: int = GENERATIONS) -> int:
    """Prompts whose G completions come to about ``tokens`` padded positions."""
    return max(1, round(tokens / (generations * EXPECTED_ROW)))


@dataclass
class Layout:
    """Everything of a realistic batch but the LM head: ids, masks, items and advantages, on the CPU."""

    target_ids: torch.Tensor  # (B, T) completion ids, PAD after the EOS
    completion_mask: torch.Tensor  # (B, T) bool
    item_ids: torch.Tensor  # (B, T) from segment_items(...).item_ids_for(loss_type)
    advantages: torch.Tensor  # (B, T) token_advantages(rank_advantages(rank_rewards(hits)), segments)
    hits: torch.Tensor  # (B, REC_NUM)
    rank_advantages: torch.Tensor  # (B, REC_NUM)
    segments: object
    prompts: int
    generations: int
    kinds: torch.Tensor  # (B,) 0 exact, 1 early stop, 2 overflow


def _randint(g, bounds, size=()):
    low, high = bounds
    return torch.randint(low, high + 1, size, generator=g)


def _completion(g, tok: BenchTokenizer, kind: int) -> list[int]:
    items = REC_NUM if kind != 1 else int(_randint(g, EARLY_ITEMS))
    ids: list[int] = []
    for _ in range(items):
        length = int(_randint(g, ITEM_TOKENS))
        ids += torch.randint(0, tok.content_ids, (length - 1,), generator=g).tolist()
        ids.append(tok.newline_ids[int(torch.randint(0, 2, (), generator=g))])
    if kind == 2:  # extra text after the list: lines of content, the last one maybe without a newline
        extra = int(_randint(g, OVERFLOW_TOKENS))
        tail = torch.randint(0, tok.content_ids, (extra,), generator=g)
        breaks = torch.rand(extra, generator=g) < 0.08
        tail[breaks] = tok.newline_ids[0]
        ids += tail.tolist()
    ids.append(tok.eos_token_id)
    return ids


def _hits(g, prompts, generations, emitted, hits_per_list):
    """(B, REC_NUM) hits: per prompt a few hot ranks with their own rate, every other rank missed by the group."""
    ranks = torch.arange(REC_NUM, dtype=torch.float64)
    lean = 1.0 / (ranks + 2).sqrt()  # hot ranks lean to the top of the list
    mean_rate = sum(HOT_RANK_HIT_RATE) / 2
    hot_p = (hits_per_list / mean_rate) * lean / lean.sum()  # E[hits per full list] = hits_per_list
    hot = torch.rand(prompts, REC_NUM, generator=g, dtype=torch.float64) < hot_p.clamp(max=1)
    low, high = HOT_RANK_HIT_RATE
    rate = hot * (low + (high - low) * torch.rand(prompts, REC_NUM, generator=g, dtype=torch.float64))
    rate = rate.repeat_interleave(generations, 0)
    draws = torch.rand(prompts * generations, REC_NUM, generator=g, dtype=torch.float64) < rate
    listed = ranks.unsqueeze(0) < emitted.unsqueeze(1)  # a rank the completion did not list is no hit
    return (draws & listed).float()


def make_layout(vocab: int, prompts: int, generations: int = GENERATIONS, hits_per_list: float = HITS_PER_LIST,
                seed: int = 0) -> Layout:
    """The ids, masks, items and advantages of a realistic batch (module docstring); seeded, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    tok = BenchTokenizer(vocab)
    B = prompts * generations
    kinds = torch.multinomial(torch.tensor([1 - EARLY_STOP - OVERFLOW, EARLY_STOP, OVERFLOW]), B, replacement=True,
                              generator=g)
    rows = [_completion(g, tok, int(k)) for k in kinds]
    T = max(len(r) for r in rows)
    target_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)  # TRL pads with pad_token_id
    completion_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        target_ids[b, : len(r)] = torch.tensor(r)
        completion_mask[b, : len(r)] = True
    # The trainer's segmentation: the tokenizer's line table, every EOS ending the list, aligned items.
    segments = segment_items(target_ids, completion_mask, line_table(tok, vocab), REC_NUM,
                             eos_token_id=tok.eos_token_id, skip_blank_lines=True)
    want = torch.where(kinds == 1, segments.items_emitted, REC_NUM)
    assert bool((segments.items_emitted[kinds != 2] == want[kinds != 2]).all()), "segmentation disagrees"
    assert bool(segments.terminated.all()) and bool(segments.overflow_mask.any(1).eq(kinds == 2).all())
    hits = _hits(g, prompts, generations, segments.items_emitted, hits_per_list)
    # RankGRPOTrainer._rank_fields: per-rank rewards -> group advantages per rank -> per-token advantages.
    rewards = rank_rewards(hits, "exp_inf")
    advantages = rank_advantages(rewards, generations, scale=SCALE_REWARDS)
    per_token = token_advantages(advantages, segments, length_shaping=True)
    return Layout(target_ids, completion_mask, segments.item_ids_for(LOSS_TYPE), per_token, hits, advantages,
                  segments, prompts, generations, kinds)


def gradient_mask(layout_or_inputs) -> torch.Tensor:
    """(B, T) bool: loss tokens of items (row, item id) with a non-zero advantage on some token. At beta = 0 (and no
    entropy term) only these tokens have a gradient: an item's ratio reaches all its tokens, and the policy term of
    an item whose advantages are all 0 is 0 whatever its ratio."""
    item_ids, advantages, mask = _fields(layout_or_inputs)
    loss = mask & (item_ids >= 0)
    B = item_ids.shape[0]
    key = torch.arange(B).unsqueeze(1) * (int(item_ids.max()) + 2) + item_ids.clamp(min=0) + 1
    nonzero = torch.zeros(B * (int(item_ids.max()) + 2) + 1, dtype=torch.bool)
    nonzero[key[loss & (advantages != 0)]] = True
    return loss & nonzero[key]


def _fields(x):
    if isinstance(x, Layout):
        return x.item_ids, x.advantages, x.completion_mask
    return x["item_ids"].cpu(), x["advantages"].cpu(), x["completion_mask"].cpu().bool()


def gemm_tokens(layout: Layout, setting: Setting) -> int:
    """Tokens that must enter a GEMM for this setting: the loss tokens (completion mask, item id >= 0), less, when
    beta == 0 (no KL, no entropy), the tokens of items whose advantage is 0 on every token."""
    if setting.beta == 0.0:
        return int(gradient_mask(layout).sum())
    return int((layout.completion_mask & (layout.item_ids >= 0)).sum())


def layout_stats(layout: Layout) -> dict:
    """The shares the report prints for a workload, and what makes them."""
    B, T = layout.target_ids.shape
    mask = layout.completion_mask
    loss = mask & (layout.item_ids >= 0)
    n_loss = int(loss.sum())
    zero = int((loss & (layout.advantages == 0)).sum())
    grad = int(gradient_mask(layout).sum())
    seg = layout.segments
    grouped = layout.hits.view(layout.prompts, layout.generations, REC_NUM)
    same = (grouped == grouped[:, :1]).all(1)  # ranks where every completion of the group scored the same
    return dict(
        prompts=layout.prompts, generations=layout.generations, rows=B, row_length=T, positions=B * T,
        completion_tokens=int(mask.sum()), loss_tokens=n_loss, gradient_tokens_beta0=grad,
        padding_share=1 - int(mask.sum()) / (B * T),
        zero_advantage_share=zero / max(1, n_loss),
        gradient_share_beta0=grad / (B * T),
        zero_advantage_rank_share=float((layout.rank_advantages == 0).float().mean()),
        uniform_rank_share=float(same.float().mean()),
        hits_per_list=float(layout.hits.sum(1).mean()),
        items_emitted_mean=float(seg.items_emitted.float().mean()),
        early_stop_share=float((layout.kinds == 1).float().mean()),
        overflow_share=float((layout.kinds == 2).float().mean()),
        item_tokens=list(ITEM_TOKENS), rec_num=REC_NUM, scale_rewards=SCALE_REWARDS,
    )
