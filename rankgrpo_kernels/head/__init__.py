"""The LM head in bounded chunks: vendor GEMMs around a backend's row pass and segment loss, one job per file.

plan.py       dtypes, scratch per token, chunk sizes, the tokens that enter the GEMMs
scratch.py    the logits scratch (padded rows), kept between calls on a CPU (``empty_cache``)
gemms.py      the GEMMs with a wider output than their operands (fp32 output for half operands)
grads.py      the gradient GEMMs of a chunk, and what every chunk of a call shares (``HeadPass``)
fused.py      the fused loss: loss and gradients in one forward, with the entropy bonus
recompute.py  log-probs, and their gradients recomputed in the backward
sharded.py    the vocabulary-parallel head over the recompute path

``ops.py`` runs it; the public functions and the argument checks use ``sharded.py``'s collectives
(``shard_range``, ``sharded_logprobs``, ``check_not_sharded_parameter``) for a vocabulary-parallel head.
"""
