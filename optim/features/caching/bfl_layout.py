"""Step cache for FLUX.2 transformers in BFL's reference layout (`double_blocks` / `single_blocks`), as ComfyUI's Flux
model and BFL's own repository build it. Pure torch: no ComfyUI import; ComfyUI is reached from nodes/ only.

The skip decision and its statistics are the pack's shared ones (decision.CacheRun / Branch with the shared gate,
each method's own run and state from fbcache.new_run / teacache.new_run, and their decisions fbcache.may_reuse /
teacache.decide, as fbcache.py and teacache.py use them for diffusers' Flux2Transformer2DModel); only
the adapter to the block layout lives here. It plugs into the layout's block-replacement convention: the forward
calls `replace(args, {"original_block": run_block})` for a key ("double_block", i) / ("single_block", i) where
`args` holds img, txt (double blocks), vec, pe, attn_mask, transformer_options, and the replacement returns
{"img", "txt"} (double) or {"img"} (single). The single-stream blocks see cat(txt, img); after the last one the
forward keeps the image part. Blocks may add to their input tensors in place (ComfyUI's do), so every tensor kept
across blocks is a copy.

Per model call (`BflStepCache.model_call`): the batch is split into CFG branches ("cond", "uncond", as the caller
names its chunks), each with its own state. The first double block decides per branch; the call skips only when
every branch in it may skip (they share one batched forward, so computing one computes all; a branch that could
have skipped is then computed and its state updated as computed). On a skipped call:
- fbcache: the first double block runs and the image stream gets the cached residual of the remaining blocks (image
  output of the last single block minus image output of the first double block);
- teacache: no block runs; the image stream gets the cached residual of all blocks.
The residual covers every image-stream token, reference-image tokens included, so it is reused consistently; the
forward drops the reference part afterwards.

Steps: given the run's sigma schedule (`schedule=`) and each call's sigma (`model_call(..., sigma=)`), a call
belongs to the step whose sigma range it falls in, so a sampler that calls the model more than once per step (heun,
dpm_2, the SDE samplers) gets warmup and the start..end window in steps, as euler does.

Only two blocks carry a replacement for the whole run: the first double block (it decides) and the last single block
(it measures the residual on a computed call and, on a skipped call, hands the cached result on). The blocks between
run untouched, with no Python in between, on a computed call. On a skipped call, the first block puts pass-through
replacements for them into the call's own block-replacement table (`model_call(..., block_table=)`, the dict the
forward looks each block up in), and the call's end takes them out again. A forward that does not look blocks up in
that dict still gives the right result, since the last single block hands on the cached image whatever the blocks
between did; it only does not save their time.

Public API (what the ComfyUI adapter in nodes/ uses): STATE_KEY, BflStepCache(settings, total_steps, family,
first_block, num_double, num_single, schedule=None), .model_call(cond_or_uncond, batch_size, device,
block_table=None, sigma=None), .stats(),
block_replacements(num_double, num_single), branch_names(cond_or_uncond), modulated_input(block, img, vec).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ...errors import InputError
from . import fbcache, teacache
from .decision import Branch
from .transformer_hook import synchronize

# The methods this adapter runs (magcache and taylorseer are diffusers' hooks, for the pack's own transformer).
METHODS = ("fbcache", "teacache")
# Where a run's BflStepCache lives in the forward's transformer_options.
STATE_KEY = "flux2_accel_step_cache"
BRANCH_KINDS = {0: "cond", 1: "uncond"}


def branch_names(cond_or_uncond) -> list[str]:
    """Names of the batch's chunks: ComfyUI marks each chunk 0 (cond) or 1 (uncond); a kind that occurs more than
    once (several conds in one batch) gets '#2', '#3'... so every chunk keeps its own state. None: one 'cond'."""
    if not cond_or_uncond:
        return ["cond"]
    names, seen = [], {}
    for kind in cond_or_uncond:
        base = BRANCH_KINDS.get(kind, f"kind{kind}")
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def modulated_input(block, img: torch.Tensor, vec) -> torch.Tensor:
    """TeaCache's signal in BFL's layout: the first double block's modulated image input before attention,
    (1 + scale) * img_norm1(img) + shift. `vec` is the global modulation ((img_mod1, img_mod2), txt_mods) FLUX.2
    hands every block, or the plain vector a block modulates itself (FLUX.1-style, block.img_mod)."""
    if isinstance(vec, (tuple, list)):
        (img_mod1, _img_mod2), _txt = vec
    else:
        img_mod1, _img_mod2 = block.img_mod(vec)
    return (1 + img_mod1.scale) * block.img_norm1(img) + img_mod1.shift


@dataclass
class _Call:
    """One model call in progress."""

    branches: list[Branch]
    rows: int  # batch rows per branch
    block_table: dict | None = None  # the forward's block-replacement table for this call
    skip: bool = False
    reference: torch.Tensor | None = None  # image stream the cached residual is measured from
    skipped_image: torch.Tensor | None = None  # on a skipped call: the image stream the call hands on
    passed_through: int = 0  # blocks the forward let through untouched on a skipped call
    displaced: dict = field(default_factory=dict)  # table entries the pass-throughs replaced for this call

    def chunks(self, tensor: torch.Tensor):
        for i, branch in enumerate(self.branches):
            yield branch, tensor[i * self.rows:(i + 1) * self.rows]

    def joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class BflStepCache:
    """One sampling run's step cache on a BFL-layout model. Create one per run (fresh state), put it in the
    forward's transformer_options[STATE_KEY], wrap each model call in `model_call`, and install
    `block_replacements` in the forward's block-replacement table."""

    def __init__(self, settings, total_steps: int | None, family: str, first_block: torch.nn.Module,
                 num_double: int, num_single: int, schedule=None):
        settings.validate()
        if settings.method not in METHODS:
            raise InputError(f"cache method '{settings.method}' is not available on a BFL-layout (ComfyUI) FLUX.2 "
                             "model: choose fbcache or teacache.")
        if num_double < 1 or num_single < 1:
            raise InputError(f"the step cache needs double and single blocks; this model has {num_double} double "
                             f"and {num_single} single blocks.")
        self.run = (teacache if settings.method == "teacache" else fbcache).new_run(settings, total_steps, family)
        self.first_block = first_block
        self.num_double = num_double
        self.num_single = num_single
        # the sampler's sigmas, highest first (steps + 1 values); None: a step is a branch's call
        if isinstance(schedule, torch.Tensor):
            schedule = schedule.tolist()
        self.schedule = None if schedule is None else [float(v) for v in schedule]
        self.call: _Call | None = None

    def step_of(self, sigma) -> int | None:
        """The step a call at noise level `sigma` belongs to: how many of the schedule's sigmas lie above it (the
        call at the schedule's i-th sigma is step i; a sampler's in-between calls count with the step they are
        inside). None without a schedule or a sigma."""
        if self.schedule is None or sigma is None:
            return None
        value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        tolerance = 1e-6 * max(1.0, abs(value))
        return sum(1 for level in self.schedule if level > value + tolerance)

    @property
    def settings(self):
        return self.run.settings

    def stats(self) -> dict:
        return self.run.stats()

    # -- one model call
    @contextlib.contextmanager
    def model_call(self, cond_or_uncond, batch_size: int, device: torch.device, block_table: dict | None = None,
                   sigma=None):
        """Wrap one model call. `block_table`: the dict the forward looks block replacements up in during this
        call (its own copy: a skipped call puts pass-throughs in it for the blocks between the first and the last,
        and takes them out when the call ends). `sigma`: the call's noise level (with the run's schedule, it
        gives the call's step)."""
        names = branch_names(cond_or_uncond)
        if batch_size % len(names):  # chunks of unequal size: not a layout we can split, treat as one branch
            names = ["cond"]
        branches = []
        for name in names:
            self.run.branch_name = name
            branches.append(self.run.branch())
        self.run.branch_name = None
        self.run.step_index = self.step_of(sigma)
        call = self.call = _Call(branches, batch_size // len(branches), block_table)
        start = time.perf_counter()
        try:
            yield call
            synchronize(device)
            seconds = (time.perf_counter() - start) / len(branches)
            for branch in branches:
                branch.skipped = call.skip
                self.run.record(branch, call.skip, seconds)
        finally:
            self.call = None
            self.run.step_index = None
            self._restore_table(call)

    def _middle_blocks(self):
        yield from (("double_block", i) for i in range(1, self.num_double))
        yield from (("single_block", i) for i in range(self.num_single - 1))

    def _let_middle_blocks_through(self, call: _Call) -> None:
        if call.block_table is None:
            return
        for key in self._middle_blocks():
            if key in call.block_table:
                call.displaced[key] = call.block_table[key]
            call.block_table[key] = self._pass_double if key[0] == "double_block" else self._pass_single

    def _restore_table(self, call: _Call) -> None:
        if call.block_table is None or not call.skip:
            return
        for key in self._middle_blocks():
            if key in call.displaced:
                call.block_table[key] = call.displaced[key]
            else:
                call.block_table.pop(key, None)

    # the pass-throughs a skipped call puts in its table: they count, so the last block knows they were used
    def _pass_double(self, args: dict, extra: dict) -> dict:
        if self.call is not None:
            self.call.passed_through += 1
        return {"img": args["img"], "txt": args["txt"]}

    def _pass_single(self, args: dict, extra: dict) -> dict:
        if self.call is not None:
            self.call.passed_through += 1
        return {"img": args["img"]}

    # -- the block replacements' work
    def first_double_block(self, args: dict, extra: dict) -> dict:
        call = self.call
        if call is None:
            return extra["original_block"](args)
        if self.settings.method == "teacache":
            out = self._teacache_first(call, args, extra)
        else:
            out = self._fbcache_first(call, args, extra)
        if call.skip:
            # a copy: where the forward runs the blocks between after all, they add to their input in place
            call.skipped_image = out["img"].clone()
            self._let_middle_blocks_through(call)
        return out

    def last_single_block(self, args: dict, extra: dict) -> dict:
        call = self.call
        if call is None:
            return extra["original_block"](args)
        if call.skip:
            return {"img": self._handed_on(call, args["img"])}
        out = extra["original_block"](args)
        if call.reference is not None:
            stream = out["img"]
            image = stream[:, stream.shape[1] - call.reference.shape[1]:]
            self._keep_residual(call, image - call.reference)
            call.reference = None
        return out

    def _handed_on(self, call: _Call, stream: torch.Tensor) -> torch.Tensor:
        """The last single block's output on a skipped call: the text part of the stream as it came, the image part
        the first block decided on. When every block between was let through, that is the stream itself."""
        if call.passed_through == self.num_double - 1 + self.num_single - 1:
            return stream
        image = call.skipped_image
        return torch.cat((stream[:, :stream.shape[1] - image.shape[1]], image), dim=1)

    def _fbcache_first(self, call: _Call, args: dict, extra: dict) -> dict:
        before = args["img"].clone()  # BFL-layout blocks add to their input in place
        out = extra["original_block"](args)
        first_residual = out["img"] - before
        decisions = [fbcache.may_reuse(self.run, branch, part) for branch, part in call.chunks(first_residual)]
        if all(decisions):
            call.skip = True
            parts = [fbcache.reused(branch, part) for branch, part in call.chunks(out["img"])]
            return {"img": call.joined(parts), "txt": out["txt"]}
        for branch, part in call.chunks(first_residual):
            fbcache.keep_first_residual(branch, part)
        call.reference = out["img"].clone()  # the next block adds to it in place
        return out

    def _teacache_first(self, call: _Call, args: dict, extra: dict) -> dict:
        img = args["img"]
        modulated = modulated_input(self.first_block, img, args["vec"])
        decisions = [teacache.decide(self.run, branch, part) for branch, part in call.chunks(modulated)]
        if all(decisions):
            call.skip = True
            parts = [part + branch.state.residual for branch, part in call.chunks(img)]
            return {"img": call.joined(parts).contiguous(), "txt": args["txt"]}
        for branch, could_skip in zip(call.branches, decisions):
            if could_skip:  # computed after all, with the other branches: start accumulating afresh
                branch.state.accumulated = 0.0
        call.reference = img.clone()  # the block adds to it in place
        return extra["original_block"](args)

    def _keep_residual(self, call: _Call, residual: torch.Tensor) -> None:
        for branch, part in call.chunks(residual):
            if self.settings.method == "teacache":
                branch.state.residual = part
            else:
                fbcache.keep_residual(branch, part)


def _state(args: dict) -> BflStepCache | None:
    options = args.get("transformer_options") or {}
    return options.get(STATE_KEY)


def block_replacements(num_double: int, num_single: int) -> dict:
    """Replacement functions for the two blocks the cache works at, the first double block and the last single
    block, keyed as the layout's forward looks them up. Each finds the run's BflStepCache in
    args["transformer_options"][STATE_KEY]; without one (no run installed) it runs the block. The blocks between
    need none for the whole run (see the module's docstring)."""

    def first_double(args, extra):
        state = _state(args)
        return extra["original_block"](args) if state is None else state.first_double_block(args, extra)

    def last_single(args, extra):
        state = _state(args)
        return extra["original_block"](args) if state is None else state.last_single_block(args, extra)

    return {("double_block", 0): first_double, ("single_block", num_single - 1): last_single}
