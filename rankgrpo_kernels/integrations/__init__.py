"""Adapters that put the fused Rank-GRPO loss into training frameworks.

Each submodule imports its framework itself, so ``import rankgrpo_kernels`` never needs any of them:

* ``rankgrpo_kernels.integrations.trl``: ``RankGRPOConfig`` and ``RankGRPOTrainer`` for TRL 1.16.
* ``rankgrpo_kernels.integrations.openrlhf``: policy loss, experience-maker hook and fused actor forward for
  OpenRLHF 0.11.
* ``rankgrpo_kernels.integrations.verl``: advantage estimator, loss hook and fused log-probs for verl 0.9.
* ``rankgrpo_kernels.integrations.plain``: helpers for a hand-written loop over a Hugging Face causal LM.
* ``rankgrpo_kernels.integrations.tiny_recommender``: a tiny local model, tokenizer and recommendation task for the
  examples and tests.
"""
