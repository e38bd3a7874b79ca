"""LM-head shapes of real models, and the scaled-down shapes the CPU default runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShape:
    name: str
    hidden: int  # H
    vocab: int  # V
    tokens: int  # N = rows * row_length completion tokens
    row_length: int = 512  # T, completion tokens per row (20 items of ~25 tokens)
    scaled_from: str | None = None  # the real head a CPU shape stands in for

    def __post_init__(self):
        if self.tokens % min(self.row_length, self.tokens):
            raise SystemExit(f"{self.name}: N={self.tokens} is not a whole number of rows of {self.row_length} tokens")

    @property
    def rows(self) -> int:
        return max(1, self.tokens // self.row_length)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.tokens}"

    @property
    def spec(self) -> str:
        """What ``parse_shape`` turns back into this shape."""
        return self.key if self.key in ALL_SHAPES else f"{self.hidden}x{self.vocab}@{self.tokens}"

    def fields(self, setting=None) -> dict:
        """The fields a result row of this shape (and setting) starts with."""
        return dict(shape=self.key, hidden=self.hidden, vocab=self.vocab, tokens=self.tokens,
                    scaled_from=self.scaled_from, **({} if setting is None else dict(setting=setting)))


MODEL_HEADS = {
    "qwen2.5-0.5b": (896, 151936),
    "llama-3.2-1b": (2048, 128256),
    "llama-3.2-3b": (3072, 128256),
    "qwen2.5-7b": (3584, 152064),
}

GPU_SHAPES = [HeadShape(name, h, v, tokens) for name, (h, v) in MODEL_HEADS.items() for tokens in (4096, 16384)]

# On a CPU the real heads take minutes per step: same token layout, heads scaled down (and said so in the table).
CPU_SHAPES = [
    HeadShape("cpu-small", 512, 32000, 4096, scaled_from="foundation target (N=4096, H=512, V=32000)"),
    HeadShape("cpu-qwen-0.5b/8", 224, 18992, 2048, scaled_from="qwen2.5-0.5b, H and V / 4 and / 8"),
]

ALL_SHAPES = {s.key: s for s in GPU_SHAPES + CPU_SHAPES}
# The GPU default: the two heads of the GPU check at ~16k positions.
GPU_DEFAULT_SHAPES = [ALL_SHAPES["qwen2.5-0.5b@16384"], ALL_SHAPES["llama-3.2-3b@16384"]]


def default_shapes(device_type: str, full: bool = False) -> list[HeadShape]:
    """The default: on a CPU the scaled-down Qwen2.5-0.5B head at ~2k positions (a few minutes with every peer), on a
    GPU the Qwen2.5-0.5B and Llama-3.2-3B heads at ~16k. ``full`` (the long sweep): on a CPU the foundation head
    (N=4096, H=512, V=32000) too, on a GPU every model head at 4k and 16k."""
    if device_type != "cuda":
        return CPU_SHAPES if full else CPU_SHAPES[1:]
    return GPU_SHAPES if full else GPU_DEFAULT_SHAPES


def parse_shape(text: str) -> HeadShape:
    """A registry key (``qwen2.5-0.5b@16384``) or ``HxV@N`` for a custom head (``512x32000@4096``)."""
    if text in ALL_SHAPES:
        return ALL_SHAPES[text]
    try:
        head, n = text.split("@")
        h, v = (int(x) for x in head.split("x"))
        n = int(n)
    except ValueError:
        raise SystemExit(f"unknown shape {text!r}: use one of {sorted(ALL_SHAPES)} or HxV@N") from None
    row_length = next(r for r in (512, 384, 256, 128, 64, 32, 16, 8, 4, 2, 1) if r <= n and n % r == 0)
    return HeadShape(f"custom-{h}x{v}", h, v, n, row_length=row_length)
