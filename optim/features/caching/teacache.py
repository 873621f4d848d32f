"""TeaCache for FLUX.2: skip every block while the rescaled change of the first block's modulated input stays small.

Per call, the first double-stream block's modulated image input, (1 + scale_msa) * norm1(x) + shift_msa, is compared
with the previous call's (same CFG branch): relative L1 = mean|x_t - x_{t-1}| / mean|x_{t-1}|. A polynomial fitted
per model maps that to the expected relative change of the model output; the values accumulate across skipped steps,
and a step is skipped while the sum stays under the threshold. A skipped step adds the last computed residual (blocks'
output minus input, image tokens) to its input.

Coefficients (highest power first, as numpy.poly1d):
- dev: published for FLUX.2 [dev] by NVIDIA TensorRT-LLM, fitted on the same feature (x_embedder -> first block's
  norm1 and img modulation):
  tensorrt_llm/_torch/visual_gen/models/flux/pipeline_flux2.py, FLUX2_TEACACHE_COEFFICIENTS["dev"]
  (github.com/NVIDIA/TensorRT-LLM, PR #11868 "Fix TeaCache broken caching for FLUX.1 and FLUX.2").
- klein: no published calibration exists for FLUX.2 [klein] (vllm-omni ships Qwen-Image's values for Flux2 as a
  stand-in). PLACEHOLDER: the [dev] polynomial, as the closest fit on the same architecture. Calibrate your own with
  `flux2-accel calibrate-teacache ...` (optim/features/caching/calibrate.py) and pass the printed coefficients to the
  cache node.

The gate (warmup, window, consecutive limit) is the shared one of `decision.py`; the block runner is `blocks.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from . import blocks
from .decision import Branch, CacheRun

log = logging.getLogger("flux2_accel")

TRT_LLM_FLUX2_DEV = (1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02)

COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "dev": TRT_LLM_FLUX2_DEV,
    "klein": TRT_LLM_FLUX2_DEV,  # placeholder, see the module docstring
}
CALIBRATED = {"dev": True, "klein": False}


def coefficients_for(family: str, override: tuple[float, ...] = ()) -> tuple[float, ...]:
    return tuple(override) if override else COEFFICIENTS.get(family, COEFFICIENTS["dev"])


@dataclass(frozen=True)
class TeaCacheSettings:
    """threshold: the accumulated rescaled change under which calls are skipped. coefficients: the rescaling
    polynomial, highest power first (the family's own once resolved by `new_run`)."""

    method: ClassVar[str] = "teacache"
    threshold: float = 0.1
    coefficients: tuple[float, ...] = TRT_LLM_FLUX2_DEV


@dataclass
class TeaCacheState:
    """One branch's TeaCache memory."""

    previous_input: torch.Tensor | None = None  # previous modulated input
    residual: torch.Tensor | None = None  # blocks' output minus input, image tokens
    accumulated: float = 0.0  # accumulated rescaled change
    rescale: np.poly1d | None = None


def new_run(settings, total_steps: int | None, family: str) -> CacheRun:
    if not settings.coefficients and not CALIBRATED.get(family, False):
        log.warning("flux2-accel TeaCache: no published coefficients for FLUX.2 [%s]; using the [dev] polynomial "
                    "as a placeholder. Run `flux2-accel calibrate-teacache` and paste its coefficients into the "
                    "cache node for reliable skipping.", family)
    own = TeaCacheSettings(threshold=settings.threshold,
                           coefficients=coefficients_for(family, settings.coefficients))
    return CacheRun(own, settings.gate, total_steps, new_state=TeaCacheState)


def modulated_input(first_block, hidden_states: torch.Tensor, temb_mod_img: torch.Tensor) -> torch.Tensor:
    """What the first double-stream block feeds its attention, before attention: the TeaCache signal."""
    (shift_msa, scale_msa, _gate), _mlp = Flux2Modulation.split(temb_mod_img, 2)
    return (1 + scale_msa) * first_block.norm1(hidden_states) + shift_msa


def relative_l1(current: torch.Tensor, previous: torch.Tensor, sum_across_ranks=None) -> float:
    """mean |current - previous| / mean |previous| in float32; with `sum_across_ranks` (context parallelism), over
    the whole image's tokens, the same on every rank (see fbcache.relative_change)."""
    if sum_across_ranks is None:
        diff = (current - previous).abs().mean(dtype=torch.float32)
        return float(diff / previous.abs().mean(dtype=torch.float32).clamp_min(1e-12))
    sums = sum_across_ranks(torch.stack([(current - previous).abs().sum(dtype=torch.float32),
                                         previous.abs().sum(dtype=torch.float32)]))
    return float(sums[0] / sums[1].clamp_min(1e-12))


@torch.compiler.disable
def decide(run: CacheRun, branch: Branch, modulated: torch.Tensor) -> bool:
    """True to reuse the last residual for this call. Updates the branch's TeaCacheState."""
    state: TeaCacheState = branch.state
    previous, state.previous_input = state.previous_input, modulated
    if (previous is None or previous.shape != modulated.shape or state.residual is None
            or state.residual.shape != modulated.shape or not run.may_skip(branch)):
        state.accumulated = 0.0
        return False
    if state.rescale is None:
        state.rescale = np.poly1d(run.settings.coefficients)
    state.accumulated += abs(float(state.rescale(relative_l1(modulated, previous, run.sum_across_ranks))))
    if state.accumulated < run.settings.threshold:
        return True
    state.accumulated = 0.0
    return False


def run_blocks(runner: blocks.Flux2CachedTransformerBlocks, branch, hidden_states, encoder_hidden_states,
               block_kwargs):
    modulated = modulated_input(runner.transformer_blocks[0], hidden_states, block_kwargs["temb_mod_img"])
    skip = decide(runner.run, branch, modulated)
    torch._dynamo.graph_break()
    if skip:
        hidden_states = (hidden_states + branch.state.residual).contiguous()
    else:
        before = hidden_states
        encoder_hidden_states, hidden_states = runner.remaining_blocks(
            hidden_states, encoder_hidden_states, block_kwargs, start=0)
        branch.state.residual = hidden_states - before
    torch._dynamo.graph_break()
    return encoder_hidden_states, hidden_states, skip


def installed(transformer, run: CacheRun):
    return blocks.installed(transformer, run, run_blocks)
