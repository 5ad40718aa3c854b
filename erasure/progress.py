"""How a long job reports progress, answers Cancel and logs: one object instead of three callbacks.

The command line fills it from a tqdm bar, the ComfyUI nodes from ComfyUI's ProgressBar and its interrupt check;
the default reports nothing and is never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    #: called with the number of units (training steps, sampling steps) just finished
    update: Callable[[int], None] | None = None
    #: raises to stop the job (ComfyUI's Cancel); called between UNet evaluations
    interrupt: Callable[[], None] | None = None
    #: one line of text for the user (console, tqdm.write)
    log: Callable[[str], None] | None = None
    #: called with a number of units to add to the total (work found to be needed while running, e.g. MACE's
    #: LoRA rounds past the preset's budget)
    grow: Callable[[int], None] | None = None

    def step(self, n: int = 1) -> None:
        if self.update is not None:
            self.update(n)

    def check(self) -> None:
        if self.interrupt is not None:
            self.interrupt()

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def extend(self, n: int) -> None:
        if self.grow is not None and n > 0:
            self.grow(n)


#: reports nothing, never interrupted
SILENT = Progress()


def as_progress(progress: Progress | None) -> Progress:
    return SILENT if progress is None else progress
