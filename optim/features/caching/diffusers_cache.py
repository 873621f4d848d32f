"""Running one of diffusers' own cache hooks (`transformer.enable_cache(config)`) as a step cache for one run.

Used by `magcache.py` and `taylorseer.py`. The hooks are enabled for one run and disabled after it, so each run
starts with fresh hook state. diffusers' hooks need a cache context on every call; the [dev] pipeline sets none, so
calls outside one run inside `cache_context("cond")`. Whether a call was skipped is read from an execution probe:
the last single-stream block's fused input projection runs only when that block really computes (both methods skip
by replacing a block's or an attention's forward, never its inner layers).
"""

from __future__ import annotations

import contextlib

from ...errors import InputError
from .decision import Branch, CacheRun
from .transformer_hook import step_cache_installed


def require_steps(method: str, total_steps: int | None) -> int:
    if not total_steps:
        raise InputError(f"{method} needs the run's step count: set RunReport.params before the run.")
    return total_steps


def _execution_probe(transformer):
    return transformer.single_transformer_blocks[-1].attn.to_qkv_mlp_proj


@contextlib.contextmanager
def installed(transformer, run: CacheRun, config):
    """diffusers' cache `config` on `transformer` for one run, counted by `run`."""
    executed = [0]

    def count(module, inputs):
        executed[0] += 1

    def call(original_forward, branch: Branch, args, kwargs):
        before = executed[0]
        context = (contextlib.nullcontext() if run.branch_name is not None
                   else transformer.cache_context(branch.name))
        with context:
            output = original_forward(*args, **kwargs)
        return output, executed[0] == before

    transformer.enable_cache(config)
    hook = _execution_probe(transformer).register_forward_pre_hook(count)
    try:
        with step_cache_installed(transformer, run, call):
            yield
    finally:
        hook.remove()
        transformer.disable_cache()
