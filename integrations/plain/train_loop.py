"""Rank-GRPO in a hand-written PyTorch loop: sample lists with ``generate``, score each rank, take fused-loss steps.

The same tiny recommender as the TRL example (a warm-started model that follows the asked genre only partly),
trained without any trainer framework through ``rankgrpo_kernels.adapters.plain``. Each batch of
samples is used for two updates; the second is off-policy, so its item ratios use the log-probs recorded before
the first. A frozen copy of the warm-started model is the KL reference.

    python integrations/plain/train_loop.py [--steps 80] [--rec-num 4]     # about 20 s on one CPU core

Prints a progress bar with the loss and the reward of each rank, then the per-rank hit rate of sampled lists
before and after training.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: integrations.tiny_recommender

from integrations.tiny_recommender import (  # noqa: E402
    build_tiny_recommender, hit_rate_per_rank, print_report, quiet_cpu_run,
)
from rankgrpo_kernels.adapters.plain import (  # noqa: E402
    completion_logprobs,
    rank_grpo_loss_for_model,
    rank_grpo_step_inputs,
    trim_completions,
)
from rankgrpo_kernels.recommender import item_hits  # noqa: E402


def sample_completions(model, tokenizer, prompts: list[str], num_generations: int, temperature: float,
                       max_new_tokens: int) -> list[list[int]]:
    """G sampled completions per prompt, rows ``[g*G, (g+1)*G)`` for prompt g, each up to and including its EOS."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = model.generate(**encoded, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return trim_completions(sequences, encoded["input_ids"].shape[1], tokenizer.eos_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="batches of samples (two updates each)")
    parser.add_argument("--rec-num", type=int, default=4, help="N, the titles each answer lists")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny matrices: one is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_cpu_run(args.threads)
    start = time.perf_counter()
    rng = random.Random(args.seed)
    N, G, T = args.rec_num, args.num_generations, args.temperature

    with tempfile.TemporaryDirectory() as workdir:
        world = build_tiny_recommender(Path(workdir) / "model", rec_num=N, seed=args.seed)
    model, tokenizer = world.model, world.tokenizer
    print(f"warm-started the tiny recommender in {time.perf_counter() - start:.0f} s")
    before = hit_rate_per_rank(model, tokenizer, world.rows, N)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    history = []

    bar = tqdm(range(args.steps), desc="Rank-GRPO", unit="step")
    for _ in bar:
        rows = rng.sample(world.rows, args.prompts_per_step)
        completions = sample_completions(model, tokenizer, [row["prompt"] for row in rows], G, T, 8 * N + 8)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        relevant = [row["relevant"] for row in rows for _ in range(G)]
        hits = [item_hits(text, titles, N) for text, titles in zip(texts, relevant)]
        prompt_ids = [tokenizer(row["prompt"])["input_ids"] for row in rows for _ in range(G)]
        batch = rank_grpo_step_inputs(tokenizer, prompt_ids, completions, hits, num_generations=G, rec_num=N)

        old = completion_logprobs(model, batch, temperature=T)  # the behaviour policy, before any update
        ref = completion_logprobs(reference, batch, temperature=T)
        for _update in range(2):
            loss, stats = rank_grpo_loss_for_model(model, batch, old_logps=old, ref_logps=ref, beta=1e-3,
                                                   temperature=T, loss_type="bnpo")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        ranks = batch.rewards.mean(0).tolist()
        history.append(ranks)
        bar.set_postfix_str(f"loss {loss.item():+.4f} | clip {stats['clip_ratio_region'].item():.2f} | reward per "
                            "rank " + " ".join(f"{r:.2f}" for r in ranks))

    after = hit_rate_per_rank(model, tokenizer, world.rows, N)
    print_report(history, before, after, time.perf_counter() - start)


if __name__ == "__main__":
    main()
