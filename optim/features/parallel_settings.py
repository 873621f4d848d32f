"""How to split one image over GPUs (the Parallel node's widgets, `generate`'s --gpus/--parallel): settings only.

Torch-free, so the CLI builds its flags from them without loading torch; optim/features/context_parallel.py does the
splitting and optim/parallel runs the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..options import MAX_PARALLEL_GPUS, PARALLEL_MODES


@dataclass(frozen=True)
class ParallelSettings:
    """How to split one image over GPUs: the Parallel node's widgets, `generate --gpus/--parallel`.

    mode: "ulysses" (all-to-all over attention heads), "ring" (ring attention over the sequence), "cfg" (the two
    branches of a [klein] base CFG run on two halves of the GPUs, each half splitting its branch with Ulysses when it
    has more than one), "auto" (CFG splitting when the run has a negative prompt and an even GPU count, and Ulysses
    over the GPUs of each branch, or ring where the heads do not divide by them)."""

    gpus: int = 2
    mode: str = "ulysses"

    def validate(self) -> None:
        if self.mode not in PARALLEL_MODES:
            raise InputError(f"parallel mode is '{self.mode}': choose one of {', '.join(PARALLEL_MODES)}.")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 2 <= self.gpus <= MAX_PARALLEL_GPUS:
            raise InputError(f"parallel gpus is {self.gpus!r}: it must be a whole number from 2 to "
                             f"{MAX_PARALLEL_GPUS} (one GPU needs no Parallel node).")
        if self.mode == "cfg" and self.gpus % 2:
            raise InputError(f"parallel mode 'cfg' runs the two CFG branches on two halves of the GPUs: gpus is "
                             f"{self.gpus}, choose an even number (or mode 'auto').")


def rank_resources(on_gpu: bool) -> dict[str, float]:
    """What one rank of the actor group reserves on Ray: a GPU, or, in a cluster without GPUs, one CPU (gloo).
    The group's actors and a Serve replica's placement group (which must hold them) both take it from here."""
    return {"GPU": 1.0} if on_gpu else {"CPU": 1.0}
