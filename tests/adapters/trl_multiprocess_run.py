"""One short ``RankGRPOTrainer`` run on the tiny recommender, for ``tests/adapters/test_trl_multiprocess.py``.

The test launches this file with torchrun on 127.0.0.1 (2 processes: DDP, FSDP2 or DeepSpeed ZeRO-3) and calls
``run`` in its own process for the single-process reference on the same global batch. Sampling is replaced by fixed
completions, a function of the prompt, of the row's place in the global generation batch and of the generation
round, so that every run sees the same data however the batch is split over processes. Rank 0 saves the logged
losses and metrics and the trained parameters, whole (gathered from FSDP2 shards or ZeRO-3 partitions).

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT tests/adapters/trl_multiprocess_run.py \\
        --model DIR --out FILE --mode ddp|fsdp2|zero3 [--loss-type dapo] [--grad-accum 1] [--num-iterations 1] \\
        [--head-unit]

Needs the ``[trl]`` extra; ``--mode zero3`` needs DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

REC_NUM = 4
NUM_GENERATIONS = 4
GLOBAL_BATCH = 16  # completions per optimizer step: 4 prompts x 4 generations
MAX_COMPLETION_LENGTH = 32
STEPS = 3

# DeepSpeed ZeRO-3 with every parameter partitioned (threshold 0: the tiny head would otherwise stay whole), no
# prefetching, TRL's own settings filled in by transformers ("auto"), and the torch SGD the other runs use.
ZERO3_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
}


def fixed_completion(tokenizer, prompt_ids: list[int], row: int, generation_round: int) -> list[int]:
    """3 to 5 catalogue titles (now and then separated by blank lines), then EOS: the same in every run, varied
    enough for the per-rank advantages not to vanish."""
    from integrations.tiny_recommender import ALL_TITLES

    rng = random.Random(zlib.crc32(repr(prompt_ids).encode()) * 1009 + row * 31 + generation_round)
    titles = rng.sample(ALL_TITLES, rng.choice([3, 4, 4, 5]))
    text = "\n".join(titles) if rng.random() < 0.8 else "\n\n".join(titles)
    return tokenizer(text)["input_ids"][: MAX_COMPLETION_LENGTH - 1] + [tokenizer.eos_token_id]


def trainer_class():
    from rankgrpo_kernels.adapters.trl import RankGRPOTrainer

    class FixedCompletionTrainer(RankGRPOTrainer):
        """``RankGRPOTrainer`` whose sampling returns ``fixed_completion`` for every row."""

        _generation_round = 0

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            first_row = self.accelerator.process_index * len(prompt_ids)  # each process holds a contiguous part
            self._generation_round += 1
            completions = [fixed_completion(self._tokenizer, ids, first_row + i, self._generation_round)
                           for i, ids in enumerate(prompt_ids)]
            return completions, None

    return FixedCompletionTrainer


def allow_fsdp_on_cpu() -> None:
    """accelerate enables FSDP for accelerator devices only: on the CPU its state stays MULTI_CPU and drops the FSDP
    plugin, although FSDP2 runs there with gloo. Keep the plugin the trainer passes, so that accelerate prepares the
    model exactly as on GPUs (``fsdp2_prepare_model``) and transformers and TRL take their FSDP paths."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            # Both singletons: a later AcceleratorState() copies the PartialState's type back.
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def deepspeed_on_cpu() -> None:
    """accelerate runs DeepSpeed only when not told to use the CPU, and then, without GPUs, with no collective
    backend (it would count one process). Set up its state first, as ``accelerate launch`` with a DeepSpeed config
    does but with gloo, for the trainer to take over (``use_configured_state``); DeepSpeed runs ZeRO-3 on its CPU
    accelerator unchanged."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def save_untied_copy(model_dir: str, untied_dir: str) -> None:
    """Save the model with an LM head of its own, a copy of the tied embedding (the same starting weights)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(model_dir, tie_word_embeddings=False)
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(untied_dir)
    PreTrainedTokenizerFast.from_pretrained(model_dir).save_pretrained(untied_dir)


@contextmanager
def recording_head_types(seen: set[str]):
    """Record the type of the head the fused loss got from the model: a plain tensor, or an FSDP2 DTensor shard."""
    from rankgrpo_kernels.adapters.trl import trainer as adapter

    full_head_tensor = adapter.full_head_tensor

    def recording_full_head_tensor(tensor):
        if tensor is not None:
            seen.add(type(tensor).__name__)
        return full_head_tensor(tensor)

    adapter.full_head_tensor = recording_full_head_tensor
    try:
        yield
    finally:
        adapter.full_head_tensor = full_head_tensor


def full_parameters(model, mode: str) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective under FSDP2 and ZeRO-3: every process calls it)."""
    params = dict(model.named_parameters())
    if mode == "fsdp2":
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in params.items()}
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {name: p.detach().clone() for name, p in params.items()}
    return {name: p.detach().clone() for name, p in params.items()}


def run(model_dir: str, mode: str, out: str | None = None, loss_type: str = "dapo", grad_accum: int = 1,
        num_iterations: int = 1, head_unit: bool = False) -> dict:
    """Train ``STEPS`` optimizer steps on ``GLOBAL_BATCH`` completions each (mode ``single``: in this process).
    Returns, and with ``out`` rank 0 saves, the losses, the logged metrics, the trained parameters and what the
    fused head saw."""
    if mode == "zero3":
        deepspeed_on_cpu()  # before anything creates accelerate's state
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, PrinterCallback

    from integrations.tiny_recommender import hit_reward, recommendation_rows
    from rankgrpo_kernels.adapters.trl import RankGRPOConfig

    extra: dict = {}
    if mode == "fsdp2":
        allow_fsdp_on_cpu()
        # With "Linear", accelerate makes lm_head (and every projection) a unit of its own: the head stays sharded.
        wrap = ["LlamaDecoderLayer", "Linear"] if head_unit else ["LlamaDecoderLayer"]
        extra = dict(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": wrap})
    elif mode == "zero3":
        extra = dict(deepspeed=ZERO3_CONFIG, accelerator_config={"use_configured_state": True})
    processes = int(os.environ.get("WORLD_SIZE", "1")) if mode != "single" else 1
    config = RankGRPOConfig(
        output_dir=str(Path(out or model_dir).parent / f"run-{mode}"), rec_num=REC_NUM,
        num_generations=NUM_GENERATIONS, per_device_train_batch_size=GLOBAL_BATCH // processes // grad_accum,
        gradient_accumulation_steps=grad_accum, num_iterations=num_iterations,
        max_completion_length=MAX_COMPLETION_LENGTH, max_steps=STEPS, logging_steps=1, learning_rate=0.5, optim="sgd",
        beta=0.04, loss_type=loss_type, seed=0, bf16=False, activation_checkpointing=False, use_cpu=mode != "zero3",
        report_to="none", save_strategy="no", disable_tqdm=True, **extra,
    )
    seen: set[str] = set()
    with recording_head_types(seen):
        trainer = trainer_class()(model=model_dir, reward_funcs=hit_reward(REC_NUM), args=config,
                                  processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
                                  train_dataset=Dataset.from_list(recommendation_rows(REC_NUM)))
        trainer.remove_callback(PrinterCallback)  # it prints every log dict
        trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    head = model.get_output_embeddings().weight
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "params": full_parameters(model, mode),
        "processes": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.name,
        "tied": head is model.get_input_embeddings().weight,
        "head_type": type(head).__name__,  # DTensor under FSDP2: the shards
        "head_numel": head.numel(),  # 0 under ZeRO-3: partitioned
        "head_types_in_forward": sorted(seen),
    }
    if out is not None and trainer.accelerator.is_main_process:
        torch.save(result, out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "zero3"], required=True)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--head-unit", action="store_true", help="FSDP2: the LM head is a unit of its own")
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    run(args.model, args.mode, args.out, args.loss_type, args.grad_accum, args.num_iterations, args.head_unit)
    import torch.distributed as dist

    dist.barrier()  # rank 0 has saved the result; no process leaves while another still talks to it
    # Leave without tearing gloo and DeepSpeed's threads down at interpreter exit, where DeepSpeed's CPU path can
    # abort ("terminate called without an active exception") after a run that went through.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
