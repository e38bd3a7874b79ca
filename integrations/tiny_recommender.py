"""A tiny conversational movie recommender, built locally in seconds, for the examples and the tests.

* a catalogue of 32 titles in 4 genres, and prompts asking for N titles of a genre like a seed title; the relevant
  titles of a prompt are the other titles of its genre (7 of 32);
* a byte-level BPE tokenizer trained in code on that text (with ``"\\n"`` and ``"\\n\\n"`` tokens), wrapped in
  ``PreTrainedTokenizerFast``;
* a 2-layer Llama (hidden 64, tied embeddings by default), warm-started by a short supervised run on lists of N
  titles of which half follow the genre: it writes well-formed lists and follows the genre only partly (a quarter
  to a third of its items are hits, against 7/32 by chance), which leaves Rank-GRPO room to improve;
* a hit-based per-rank reward for TRL and a per-rank hit-rate evaluation.

Needs ``transformers`` and ``tokenizers`` (the ``[trl]`` extra); no network access.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankgrpo_kernels.adapters.plain import trim_completions
from rankgrpo_kernels.recommender import item_hits

CATALOGUE = {
    "sci-fi": ["Star Harbor", "Moon Drift", "Orbit Nine", "Quantum Dawn",
               "Red Planet Run", "Signal Lost", "Void Runner", "Galaxy Ward"],
    "horror": ["Night Cellar", "The Hollow Bell", "Grave Tide", "Whisper House",
               "Dead Lantern", "Crimson Attic", "Bone Orchard", "The Pale Door"],
    "comedy": ["Lucky Socks", "Dinner Chaos", "Uncle Bernie", "The Wrong Wedding",
               "Pizza Kings", "Office Llama", "Rubber Chicken", "Late Again"],
    "drama": ["Quiet River", "Letters Home", "The Long Winter", "Paper Crowns",
              "Harbor Lights", "Broken Strings", "Silent Field", "The Last Train"],
}
ALL_TITLES = [title for titles in CATALOGUE.values() for title in titles]
PROMPT_TEMPLATES = (
    "User: I loved {seed}. Can you suggest {n} more {genre} movies?\nAssistant:\n",
    "User: Any {genre} films like {seed}? Give me {n}.\nAssistant:\n",
    "User: {seed} was great! Recommend {n} {genre} movies, one per line.\nAssistant:\n",
)
EOS, PAD = "<eos>", "<pad>"
# Qwen2's split pattern (whole numbers instead of single digits): newline runs become one piece ("\n\n") and
# punctuation keeps its newlines (":\n\n"), the token shapes that make list segmentation tricky.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def recommendation_rows(rec_num: int) -> list[dict]:
    """Every (template, genre, seed) prompt: ``{"prompt", "genre", "relevant"}`` with the other titles of the genre."""
    return [
        {"prompt": template.format(seed=seed, n=rec_num, genre=genre), "genre": genre,
         "relevant": [title for title in titles if title != seed]}
        for template in PROMPT_TEMPLATES for genre, titles in CATALOGUE.items() for seed in titles
    ]


def random_list(rng: random.Random, rec_num: int, relevant: Sequence[str] = (), genre_share: float = 0.0) -> str:
    """N distinct catalogue titles, one per line, no trailing newline (the code form's well-formed list); each rank
    is drawn from ``relevant`` with probability ``genre_share``, else from the whole catalogue."""
    titles = []
    for _ in range(rec_num):
        pool = relevant if rng.random() < genre_share else ALL_TITLES
        unused = [title for title in pool if title not in titles] or [t for t in ALL_TITLES if t not in titles]
        titles.append(rng.choice(unused))
    return "\n".join(titles)


def build_tokenizer(rec_num: int, vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the prompts, lists and lists with blank lines; left padding, as TRL wants."""
    rng = random.Random(0)
    lists = [random_list(rng, rec_num) for _ in range(200)]
    spaced = ["Here are my picks:\n\n" + text.replace("\n", "\n\n") for text in lists[:50]]
    corpus = [row["prompt"] for row in recommendation_rows(rec_num)] + lists + spaced
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, padding_side="left")


def build_model(tokenizer, tie_word_embeddings: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 64 over the tokenizer's vocabulary (float32, random weights)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def warm_start(model, tokenizer, rec_num: int, steps: int = 300, batch_size: int = 16, lr: float = 1e-2,
               genre_share: float = 0.0, seed: int = 0) -> float:
    """Supervised run on (prompt, list of N titles + EOS) pairs, loss on the completion only. Each title is one of
    the prompt's relevant titles with probability ``genre_share``, else any catalogue title: the model learns the
    list format and follows the genre only that much. Returns the last step's loss."""
    rng = random.Random(seed)
    rows = recommendation_rows(rec_num)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [rng.choice(rows) for _ in range(batch_size)]
        pairs = [(tokenizer(row["prompt"])["input_ids"],
                  tokenizer(random_list(rng, rec_num, row["relevant"], genre_share))["input_ids"]
                  + [tokenizer.eos_token_id])
                 for row in batch]
        width = max(len(p) + len(c) for p, c in pairs)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(pairs):
            n = len(prompt) + len(completion)
            input_ids[i, :n] = torch.tensor(prompt + completion)
            labels[i, len(prompt):n] = torch.tensor(completion)
            attention_mask[i, :n] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


@dataclass
class TinyRecommender:
    """A warm-started tiny recommender saved under ``path`` (TRL builds its reference model from that path)."""

    tokenizer: PreTrainedTokenizerFast
    model: LlamaForCausalLM
    rows: list[dict]
    rec_num: int
    path: Path


def build_tiny_recommender(directory: str | Path, rec_num: int = 4, warm_steps: int = 300, genre_share: float = 0.5,
                           tie_word_embeddings: bool = True, seed: int = 0) -> TinyRecommender:
    """Tokenizer, model and prompts; the warm-started model (``warm_start``) and tokenizer are saved to
    ``directory``."""
    tokenizer = build_tokenizer(rec_num)
    model = build_model(tokenizer, tie_word_embeddings, seed)
    warm_start(model, tokenizer, rec_num, steps=warm_steps, genre_share=genre_share, seed=seed)
    path = Path(directory)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path)  # so config._name_or_path names the saved copy
    return TinyRecommender(tokenizer, model, recommendation_rows(rec_num), rec_num, path)


def hit_reward(rec_num: int, skip_blank_lines: bool = True):
    """A TRL reward function: per-rank hits of each completion against its row's ``relevant`` titles."""

    def per_rank_hits(completions, relevant, **kwargs) -> list[list[float]]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
        return [item_hits(text, titles, rec_num, skip_blank_lines) for text, titles in zip(texts, relevant)]

    return per_rank_hits


@torch.no_grad()
def hit_rate_per_rank(model, tokenizer, rows: list[dict], rec_num: int, samples_per_prompt: int = 4,
                      temperature: float = 1.0, max_new_tokens: int = 40, seed: int = 0) -> list[float]:
    """Mean hit of each rank over ``samples_per_prompt`` sampled lists per row (N floats, rank 1 first)."""
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    prompts = [row["prompt"] for row in rows for _ in range(samples_per_prompt)]
    relevant = [row["relevant"] for row in rows for _ in range(samples_per_prompt)]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    sequences = model.generate(**encoded, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    completions = trim_completions(sequences, encoded["input_ids"].shape[1], tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    hits = torch.tensor([item_hits(text, titles, rec_num) for text, titles in zip(texts, relevant)])
    model.train(was_training)
    return hits.mean(0).tolist()


def print_report(history: list[list[float]], before: list[float], after: list[float], seconds: float) -> None:
    """What the examples print: training reward per rank early vs late, and hit rates before vs after."""
    window = max(1, len(history) // 4)
    first, last = (torch.tensor(part).mean(0).tolist() for part in (history[:window], history[-window:]))

    def ranks(values):
        return " ".join(f"{v:.2f}" for v in values)

    print(f"\ntraining reward per rank, first {window} steps: {ranks(first)}")
    print(f"training reward per rank, last {window} steps:  {ranks(last)}")
    print(f"hit rate per rank of sampled lists, before: {ranks(before)}")
    print(f"hit rate per rank of sampled lists, after:  {ranks(after)}")
    print(f"done in {seconds:.0f} s")


def quiet_cpu_run(threads: int) -> None:
    """What the examples set before training: CPU threads, no weight-loading bars, no transformers renames."""
    import warnings

    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()  # weight loading bars would break the training bar's line
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated")  # transformers 5 renames
