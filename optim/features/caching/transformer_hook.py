"""How a step cache sits on a transformer: one diffusers `ModelHook` on the module's `HookRegistry`.

`StepCacheHook` routes each forward through a method's `call(original_forward, branch, args, kwargs) -> (output,
skipped)`, times it and records it in the run. Its `branches` is a diffusers `StateManager`, so the pipeline's
`transformer.cache_context("cond"/"uncond")` reaches it like any stateful diffusers hook and names the branch of the
call in progress. `installed` registers a hook for one block and removes it on any exit, leaving the module as it was.
"""

from __future__ import annotations

import contextlib
import time

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from .decision import Branch, CacheRun

STEP_CACHE_HOOK = "flux2_accel_step_cache"


class BranchTracker(StateManager):
    """Receives the pipeline's cache context (diffusers sets it on every StateManager of a stateful hook) and keeps
    the run's current branch name in step with it."""

    def __init__(self, run: CacheRun):
        super().__init__(Branch)
        self.run = run

    def set_context(self, context) -> None:
        super().set_context(context)
        self.run.branch_name = None if context is None else context.name


def synchronize(device: torch.device) -> None:
    # Per-call timings must include the GPU work; one sync per call is noise next to a FLUX.2 forward.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepCacheHook(ModelHook):
    _is_stateful = True  # so that cache_context reaches `branches`

    def __init__(self, run: CacheRun, call):
        super().__init__()
        self.run = run
        self.call = call
        self.branches = BranchTracker(run)

    def new_forward(self, module, *args, **kwargs):
        branch = self.run.branch()
        device = kwargs["hidden_states"].device if "hidden_states" in kwargs else args[0].device
        start = time.perf_counter()
        output, skipped = self.call(self.fn_ref.original_forward, branch, args, kwargs)
        synchronize(device)
        self.run.record(branch, skipped, time.perf_counter() - start)
        return output

    def reset_state(self, module):
        return module  # the run's state is made fresh per run, never kept on the hook


@contextlib.contextmanager
def installed(module: torch.nn.Module, hook: ModelHook, name: str):
    """`hook` on `module`'s diffusers HookRegistry for the duration of the block; the module as before afterwards."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        raise RuntimeError(f"{name} is already active on this {type(module).__name__}")
    had_forward = "forward" in module.__dict__
    registry.register_hook(hook, name)
    try:
        yield hook
    finally:
        registry.remove_hook(name, recurse=False)
        if not had_forward:  # the registry puts the bound method back as an attribute: drop it
            module.__dict__.pop("forward", None)


def step_cache_installed(transformer, run: CacheRun, call):
    """A step cache routing `transformer`'s calls through `call` (see StepCacheHook) for one run."""
    return installed(transformer, StepCacheHook(run, call), STEP_CACHE_HOOK)


def counted_only(transformer, run):
    """The run's calls counted as computed, with no method deciding anything (a run too short to skip any)."""
    return step_cache_installed(transformer, run, lambda forward, branch, args, kwargs: (forward(*args, **kwargs),
                                                                                         False))
