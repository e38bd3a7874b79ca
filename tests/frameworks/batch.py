"""A batch of ranked-list completions for the framework tests, built from the tiny local tokenizer.

P prompts x G samples, N = 3 ranks; the responses cover the segmentation's cases: exactly N items, fewer (early
EOS), overflow (more than N), blank lines between items, and a truncated row without EOS.
"""

from __future__ import annotations

import torch

from integrations.tiny_recommender import ALL_TITLES, build_tokenizer

N, G, PROMPTS = 3, 4, 2
TEXTS = [
    "Star Harbor\nMoon Drift\nOrbit Nine",
    "Night Cellar\nGrave Tide",
    "Lucky Socks\nDinner Chaos\nUncle Bernie\nPizza Kings",
    "Quiet River\n\nLetters Home\n\nPaper Crowns",
]
TRUNCATED = "Harbor Lights\nBroken Strings\nSilent"


def tokenizer():
    return build_tokenizer(N)


# Qwen's chat format: "<|im_end|>" closes every turn and is the EOS, so every chat prompt holds the EOS id.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer():
    """The tiny tokenizer with Qwen's chat template and EOS ``<|im_end|>`` (local, no download)."""
    tok = build_tokenizer(N)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def responses(tok, generator: torch.Generator) -> list[list[int]]:
    """B = PROMPTS * G token-id lists, the last one cut off before its EOS."""
    rows = []
    for b in range(PROMPTS * G):
        text = TEXTS[b % len(TEXTS)].replace("Star Harbor", ALL_TITLES[b])
        rows.append(tok.encode(text) + [tok.eos_token_id])
    rows[-1] = tok.encode(TRUNCATED)
    return rows


def hits(generator: torch.Generator) -> torch.Tensor:
    """(B, N) per-rank rewards in {0, 1} with some variety inside every group."""
    return (torch.rand(PROMPTS * G, N, generator=generator) > 0.5).float()


def log_probs(mask: torch.Tensor, generator: torch.Generator, spread: float = 0.15, row_spread: float = 0.3):
    """Current (leaf, requires grad) and old log-probs (B, T), float64: per-token noise plus a per-row shift, so
    that token, item and sequence ratios all leave the clip range somewhere."""
    old = -torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 3
    noise = spread * torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    shift = row_spread * (2 * torch.rand(mask.shape[0], 1, generator=generator, dtype=torch.float64) - 1)
    new = old + noise + shift
    return new.requires_grad_(), old
