"""Rank-GRPO with TRL on CPU: ``RankGRPOTrainer`` teaches the tiny recommender to recommend the asked genre.

The warm-started model writes well-formed lists of catalogue titles but follows the asked genre only partly (a
quarter to a third of its items are hits). A hit-based per-rank reward and 150 Rank-GRPO steps raise the hit rate
of the top ranks. Everything is built locally (tokenizer, model, data set): no download, about 20 s on one CPU core.

    python integrations/trl/train_tiny_recommender.py [--steps 150] [--rec-num 4]

Prints a progress bar with the loss and the training reward of each rank, then the per-rank hit rate of sampled
lists before and after training.

Two processes (DDP over gloo; the global batch stays 32 completions, 16 on each process):

    accelerate launch --multi_gpu --num_processes 2 integrations/trl/train_tiny_recommender.py

On a machine without GPUs ``--multi_gpu`` only makes accelerate start the processes with torchrun; the script
keeps them on the CPU. Without it accelerate starts several CPU processes only through MPI, and otherwise one
process (the script says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: integrations.tiny_recommender

from integrations.tiny_recommender import (  # noqa: E402
    build_tiny_recommender, hit_rate_per_rank, hit_reward, print_report, quiet_cpu_run,
)
from rankgrpo_kernels.adapters.trl import RankGRPOConfig, RankGRPOTrainer  # noqa: E402


class RankRewardBar(TrainerCallback):
    """A progress bar over the optimizer steps showing the loss and the mean training reward of each rank."""

    def __init__(self, rec_num: int):
        self.rec_num = rec_num
        self.bar = None
        self.history = []  # [reward of rank 1..N] per logged step

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="Rank-GRPO", unit="step", disable=not state.is_world_process_zero)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in logs:  # the closing summary
            return
        ranks = [logs[f"rewards/rank_{k}/mean"] for k in range(1, self.rec_num + 1)]
        self.history.append(ranks)
        self.bar.set_postfix_str(f"loss {logs['loss']:+.4f} | reward per rank " + " ".join(f"{r:.2f}" for r in ranks))
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def warn_if_one_process_by_accelerate() -> None:
    """``accelerate launch --num_processes N`` without GPUs and without ``--multi_gpu`` runs one process (several
    only through MPI): say so, since the run would otherwise look like a distributed one."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ
    if launched_by_accelerate and "WORLD_SIZE" not in os.environ and not torch.cuda.is_available():
        print("note: accelerate launch started a single process. For several CPU processes add --multi_gpu "
              "(accelerate then starts them with torchrun; this script keeps them on the CPU with gloo).",
              file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rec-num", type=int, default=4, help="N, the titles each answer lists")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny matrices: one is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_cpu_run(args.threads)
    warn_if_one_process_by_accelerate()
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / accelerate launch set it for every process
    main_process = int(os.environ.get("RANK", "0")) == 0
    if 32 % processes:
        raise SystemExit(f"the global batch of 32 completions does not split over {processes} processes")
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as workdir:
        # Every process builds the same model (seeded); DDP starts from rank 0's copy anyway.
        world = build_tiny_recommender(Path(workdir) / "model", rec_num=args.rec_num, seed=args.seed)
        if main_process:
            print(f"warm-started the tiny recommender in {time.perf_counter() - start:.0f} s; training on {processes} "
                  f"process{'es' if processes > 1 else ''}")
            before = hit_rate_per_rank(world.model, world.tokenizer, world.rows, args.rec_num)

        config = RankGRPOConfig(
            output_dir=str(Path(workdir) / "run"), rec_num=args.rec_num, num_generations=8,
            per_device_train_batch_size=32 // processes, max_completion_length=8 * args.rec_num + 8,
            max_steps=args.steps, learning_rate=args.learning_rate, beta=1e-3, temperature=1.0, logging_steps=1,
            seed=args.seed, bf16=False, activation_checkpointing=False, use_cpu=True, report_to="none",
            save_strategy="no", disable_tqdm=True,
        )
        bar = RankRewardBar(args.rec_num)
        trainer = RankGRPOTrainer(model=world.model, reward_funcs=hit_reward(args.rec_num), args=config,
                                  train_dataset=Dataset.from_list(world.rows), processing_class=world.tokenizer,
                                  callbacks=[bar])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar shows what matters
        trainer.train()
        if main_process:
            after = hit_rate_per_rank(trainer.model, world.tokenizer, world.rows, args.rec_num)
            print_report(bar.history, before, after, time.perf_counter() - start)


if __name__ == "__main__":
    main()
