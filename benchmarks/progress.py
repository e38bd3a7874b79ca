"""The line a run shows while it goes, on stderr: the seconds since it started and the step, which names the shape
and the provider (and, in the rounds, the time left). Rewritten in place on a terminal, one line per step
elsewhere (a log keeps them all)."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, text: str):
        line = f"[{time.perf_counter() - self.started:4.0f} s] {text}"
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line[: shutil.get_terminal_size().columns - 1])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self):
        """Clear the line on a terminal (the report follows)."""
        if self.stream.isatty():
            self.stream.write("\r\033[K")
            self.stream.flush()
