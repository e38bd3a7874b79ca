"""The docstring parts the public functions share (``functional.py`` assembles them)."""

LOSS_DOC = """
    The loss (a 0-dim float32 tensor, float64 for float64 inputs) and a dict of detached 0-dim statistics:
    ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region`` (fractions of loss tokens whose item ratio is
    clipped; a token with advantage 0 is never clipped), ``ratio_mean`` (token mean of the item ratios over the loss
    tokens whose log-probs are computed: all of them, except that ``rank_grpo_loss`` leaves out the items it skips, see
    below; ``skip_zero_advantage=False`` computes them all), ``kl`` (mean k3 KL over the loss tokens, only with
    ``ref_logps``), ``entropy`` (only when given or computed; over the same tokens as ``ratio_mean``),
    ``computed_tokens`` (how many tokens those two average over; when loss tokens exist but every item was skipped it is
    0, ``ratio_mean`` 1 and ``entropy`` NaN: not measured), and per row (B,) ``clip_ratio_low_per_row`` and
    ``clip_ratio_high_per_row``: the fractions of the row's loss tokens that are clipped (0 for a row without loss
    tokens; TRL logs their minimum and maximum).

    Maths, per row i and item k (a group of tokens with the same id ``>= 0``), with ``l`` the log-probs, ``o``
    ``old_logps`` (``l.detach()`` when None: on-policy, every ratio is 1) and ``M`` the mask::

        w_k      = exp(mean_{t in k, M_t} (l_t - o_t))
        policy_t = -min(min(w_k, delta) * a_t, clamp(w_k, 1 - epsilon_low, 1 + epsilon_high) * a_t)
        KL_t     = exp(r_t - l_t) - (r_t - l_t) - 1
        loss     = sum_t c_t * policy_t + beta * sum_t kw_t * KL_t

    with ``c_t`` by ``loss_type``: ``"grpo"`` 1/(B M_i), ``"bnpo"`` 1/sum M, ``"dr_grpo"``
    1/(B max_completion_length), ``"dapo"`` 1/num_items_in_batch, ``"luspo"`` 1/B (the code form, ``kw = c``),
    and ``"rank"`` 1/(B N n_k), the paper form ``-(1/(B N)) sum_i sum_k min(w A, clip(w) A)`` with
    ``kw_t = 1/sum M``. TRL's other policy terms of the item ratio (``reference.py`` has their maths; settings in
    a ``LossSpec``): ``"sapo"`` the soft gate ``-(4/tau) sigmoid(tau (w_k - 1)) a_t`` (c as grpo), ``"cispo"``
    ``-sg(min(w_k, epsilon_high)) a_t l_t`` and ``"vespo"`` ``-sg(phi(W_k)) a_t l_t`` with W_k the item's product
    ratio (c as dapo).

    Args:
        item_ids: (B, T) integer. Ids ``>= 0`` group the tokens of a row into items (each distinct id is one
            group); negative ids are outside the loss. ``Segments.item_ids_for(loss_type)`` gives them.
        advantages: (B, T) per token (the code form: ``token_advantages`` gives them, EOS and length shaping
            included), (B,) or (B, 1) per row, or with ``advantage_level="rank"`` (B, K) per rank: token t takes
            ``advantages[b, item_ids[b, t]]`` (0 for ids >= K), which is the paper form's input with
            ``Segments.item_ids_for("rank")``; for the code form use ``token_advantages``.
        completion_mask: (B, T) bool/int, 1 on tokens in the loss (default: ``item_ids >= 0``).
        old_logps, ref_logps: (B, T) float, log-probs of the behaviour and the reference policy (constants).
        epsilon_low, epsilon_high: the clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (released: 0.06, 0.08).
        delta: optional upper bound of the unclipped ratio (two-sided clipping), > 1.
        beta: weight of the k3 KL to ``ref_logps`` (released: 1e-3); > 0 needs ``ref_logps``.
        loss_type: ``"grpo"``, ``"bnpo"`` (released runs), ``"dr_grpo"``, ``"dapo"``, ``"luspo"``, ``"sapo"``,
            ``"cispo"``, ``"vespo"`` or ``"rank"`` (paper).
        max_completion_length: ``dr_grpo``'s L_max (default T).
        num_items_in_batch: the token count of the whole optimizer step (int or 0-dim tensor), required by
            ``dapo``, ``cispo`` and ``vespo``.
        policy_weights: optional (B, T) constants ``pw_t`` (finite, >= 0) multiplying each token's policy term
            only: ``policy_t -> pw_t * policy_t``, the item ratios, normalisers, KL term and statistics unchanged
            (TRL's order: policy loss x masks x importance-sampling ratio, then + beta KL). A truncated
            importance-sampling correction (vLLM's sampler against the trainer), an off-policy or entropy mask.
        rec_num: N of the paper form (default K of per-rank advantages; required with per-token advantages).
        entropy: optional (B, T) per-token entropies, only averaged into the statistics.
        loss: the loss settings as a ``LossSpec`` instead of keywords (``rank_grpo_loss`` also takes ``head``, a
            ``HeadSpec``); the keywords a given spec holds must then stay at their defaults.
"""

NON_FINITE_DOC = """
    Non-finite inputs: a NaN or infinite log-prob of a token in the loss (from ``hidden``, ``weight`` or ``bias``) makes
    the loss NaN or infinite, so every NaN guard on the loss fires; tokens outside the loss never reach the loss or the
    gradients (their gradient rows are exactly 0, whatever they hold). Given log-probs, advantages and
    ``old_logps``/``ref_logps`` are checked instead: a non-finite ``logps``, advantage or old log-prob, or a NaN
    reference log-prob, on a token in the loss is a ``ValueError`` (``RANKGRPO_VALIDATE=0`` skips the check and the loss
    is NaN). Finite inputs never give a NaN.
"""


def doc(*parts: str):
    """Assemble a docstring from shared parts (a string expression in the body would not be one)."""

    def attach(fn):
        fn.__doc__ = "".join(parts)
        return fn

    return attach
