"""The logits scratch of a head call, and on a CPU its memory kept from one call to the next.

A call holds one (rows x V) fp32 logits chunk (``LogitsBuffer``), tens of MiB within the memory budget. On a GPU the
caching allocator hands the same memory back at every call. On a CPU glibc maps every block over 32 MiB (its
largest mmap threshold) afresh and unmaps it when freed, so each call would page in its chunk again: the kernel
zeroes and maps 64 MiB per call under the default budget, ~8% of a fused loss call on a 2-core CPU, charged to
the first GEMM that writes the chunk. So on a CPU the chunk's memory is kept per thread for the next call, up to
the call's memory budget (a single vocabulary row over the budget is freed as usual); ``empty_cache()`` frees
what is kept.

The kept memory is lent to one live ``LogitsBuffer`` at a time (a second one in the same thread, never made by the
library's own calls, gets fresh memory) and returns when that buffer is collected, so no two users ever share it.
Nothing returned to a caller aliases it: every output of a call is a tensor of its own.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["ROW_ALIGNMENT", "LogitsBuffer", "empty_cache", "padded_vocab"]

ROW_ALIGNMENT = 16  # elements: logits rows start on 64-byte boundaries, so row-pass loads vectorise for any V


def padded_vocab(vocab: int) -> int:
    """The row stride (elements) of a logits chunk: V rounded up to ``ROW_ALIGNMENT``."""
    return -(-vocab // ROW_ALIGNMENT) * ROW_ALIGNMENT


class _Kept:
    """One thread's kept CPU scratch (flat; None when there is none) and whether a live buffer holds it."""

    __slots__ = ("data", "lent", "__weakref__")

    def __init__(self):
        self.data, self.lent = None, False


_THREAD = threading.local()
_EVERY_THREAD: weakref.WeakSet = weakref.WeakSet()  # a thread's entry goes with the thread
_LOCK = threading.Lock()


def _kept() -> _Kept:
    kept = getattr(_THREAD, "kept", None)
    if kept is None:
        kept = _THREAD.kept = _Kept()
        with _LOCK:
            _EVERY_THREAD.add(kept)
    return kept


def _give_back(kept: _Kept):
    kept.lent = False


def _memory(owner, numel: int, dtype: torch.dtype, device: torch.device, keep_bytes: int) -> torch.Tensor:
    """``numel`` elements for ``owner``: the thread's kept memory on a CPU when it is free and the request is at
    most ``keep_bytes``, lent until ``owner`` is collected; otherwise a new tensor."""
    if device.type != "cpu" or numel * dtype.itemsize > keep_bytes:
        return torch.empty(numel, dtype=dtype, device=device)
    kept = _kept()
    if kept.lent:
        return torch.empty(numel, dtype=dtype, device=device)
    if kept.data is None or kept.data.dtype != dtype or kept.data.numel() < numel:
        kept.data = None  # the old block goes before the new one comes
        with torch.inference_mode(False):  # a normal tensor: later calls outside inference mode write it in place
            kept.data = torch.empty(numel, dtype=dtype, device=device)
    kept.lent = True
    weakref.finalize(owner, _give_back, kept)
    return kept.data[:numel]


def empty_cache() -> None:
    """Free the logits scratch kept on the CPU between calls, in every thread (a buffer in use keeps its memory
    until its call ends). Like ``torch.cuda.empty_cache``: for memory the process needs back between steps."""
    with _LOCK:
        every = list(_EVERY_THREAD)
    for kept in every:
        kept.data = None


class LogitsBuffer:
    """The one (rows x V) fp32 logits scratch of a call, rows ``padded_vocab(V)`` elements apart (the GEMM writes
    them with that leading dimension); ``rows(C)`` is the (C, V) view of the first C rows. On a CPU its memory is
    the thread's kept scratch when it fits ``keep_bytes`` (the call's memory budget), see the module docstring."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device, keep_bytes: int):
        self.vocab, self.stride = vocab, padded_vocab(vocab)
        self.data = _memory(self, rows * self.stride, dtype, torch.device(device), keep_bytes)

    def rows(self, count: int) -> torch.Tensor:
        return self.data.as_strided((count, self.vocab), (self.stride, 1))
