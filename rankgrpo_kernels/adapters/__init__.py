"""Adapters that put the fused Rank-GRPO loss into training frameworks.

Each submodule imports its framework itself, so ``import rankgrpo_kernels`` never needs any of them:

* ``rankgrpo_kernels.adapters.trl``: ``RankGRPOConfig`` and ``RankGRPOTrainer`` for TRL 1.16.
* ``rankgrpo_kernels.adapters.openrlhf``: policy loss, experience-maker hook and fused actor forward for
  OpenRLHF 0.11.
* ``rankgrpo_kernels.adapters.verl``: advantage estimator, loss hook and fused log-probs for verl 0.9.
* ``rankgrpo_kernels.adapters.plain``: helpers for a hand-written loop over a Hugging Face causal LM.

``hf_model`` holds what they share about Hugging Face models (the head, the backbone's hidden states), ``common``
what the log-prob frameworks (OpenRLHF, verl) share about the loss. Runnable examples, and the tiny recommender
model and tokenizer they train, live in the repository's top-level ``integrations/``.
"""
