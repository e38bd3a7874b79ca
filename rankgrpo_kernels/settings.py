"""Environment knobs, read in one place. Every name starts with ``RANKGRPO_``.

RANKGRPO_MEMORY_BUDGET  bytes of logits scratch one fused call may hold at once (default 32 MiB)
RANKGRPO_VALIDATE       "0" skips the value checks that need a host sync (NaN, target ids in range); shape,
                        dtype and device checks always run
"""

from __future__ import annotations

import os

DEFAULT_MEMORY_BUDGET = 32 * 2**20


def memory_budget(override: int | None = None) -> int:
    """The logits scratch budget in bytes: ``override`` if given, else the environment, else the default."""
    value = override if override is not None else int(os.environ.get("RANKGRPO_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET))
    if value < 2**16:
        raise ValueError(f"memory_budget_bytes (or RANKGRPO_MEMORY_BUDGET) must be at least 65536, got {value}")
    return value


def validate_values() -> bool:
    return os.environ.get("RANKGRPO_VALIDATE", "1") != "0"


def plan_chunks(num_tokens: int, vocab: int, budget_bytes: int, tile_bytes: int, row_bytes: int = 0):
    """(token chunk t, vocab chunk v) with ``t * v * tile_bytes + v * row_bytes <= budget_bytes``.

    ``tile_bytes`` is what one (token, vocab) entry costs summed over the live tiles, ``row_bytes`` what one
    vocabulary row of per-row scratch costs (the backward's d_weight slab). Token chunks of up to 1024 rows keep the
    GEMMs efficient; the vocabulary is split as much as the budget asks.
    """
    tokens = max(1, min(num_tokens, 1024))
    vocab_chunk = max(1, min(vocab, budget_bytes // (tokens * tile_bytes + row_bytes)))
    tokens = max(1, min(tokens, (budget_bytes // vocab_chunk - row_bytes) // tile_bytes))
    return tokens, vocab_chunk
