"""The block runner First Block Cache and TeaCache share, for diffusers' Flux2Transformer2DModel.

Shaped like the FLUX.1 block runners of the first-block-cache libraries (para-attn's `CachedTransformerBlocks`):
one module that runs the double-stream blocks, then the single-stream blocks. Those FLUX.1 runners do not fit FLUX.2
(para-attn picks its FLUX.1 adapter for FLUX.2 by name prefix and passes FLUX.1 arguments to FLUX.2's single
blocks). FLUX.2 differs in three ways that this runner handles:
- modulation is computed once per call, outside the blocks, and handed to every block (`temb_mod_img`/`temb_mod_txt`
  for the double-stream blocks, `temb_mod` for the single-stream blocks); the single-stream one is taken from the
  transformer's `single_stream_modulation` module as it runs (a forward hook), since the double-block loop never
  sees it;
- blocks take keyword arguments and double blocks return (encoder_hidden_states, hidden_states);
- after the blocks, the forward concatenates text and image tokens and keeps the image part; so only the image
  residual matters and no text residual is stored.

As in those runners, the forward runs with `transformer_blocks` replaced by one runner module (which
runs every block itself) and `single_transformer_blocks` by an empty list, for the duration of each call. The
blocks themselves are the transformer's own modules, so regionally compiled blocks stay compiled; the method's
decision between blocks is plain Python, the only graph break.

A method gives `run_blocks(runner, branch, hidden_states, encoder_hidden_states, block_kwargs) -> (encoder_hidden_
states, hidden_states, skipped)`, and uses `runner.remaining_blocks` for the blocks it does not skip.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.hooks import ModelHook

from .decision import Branch, CacheRun
from .transformer_hook import installed as hook_installed
from .transformer_hook import step_cache_installed

ROTARY_MEMO_HOOK = "flux2_accel_rotary_memo"


class Flux2CachedTransformerBlocks(torch.nn.Module):
    """Stands in for `transformer_blocks` during a call: the double-stream blocks, then the single-stream blocks,
    as the method's `run_blocks` decides."""

    def __init__(self, transformer, run: CacheRun, run_blocks):
        super().__init__()
        self.transformer_blocks = transformer.transformer_blocks
        self.single_transformer_blocks = transformer.single_transformer_blocks
        self.run = run
        self.run_blocks = run_blocks
        self.single_stream_mod: torch.Tensor | None = None
        self.branch: Branch | None = None

    # Called by Flux2Transformer2DModel.forward exactly as it calls a double-stream block.
    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                joint_attention_kwargs=None):
        block_kwargs = dict(temb_mod_img=temb_mod_img, temb_mod_txt=temb_mod_txt, image_rotary_emb=image_rotary_emb,
                            joint_attention_kwargs=joint_attention_kwargs)
        encoder_hidden_states, hidden_states, skipped = self.run_blocks(
            self, self.branch, hidden_states, encoder_hidden_states, block_kwargs)
        self.branch.skipped = skipped
        return encoder_hidden_states, hidden_states

    def remaining_blocks(self, hidden_states, encoder_hidden_states, block_kwargs, start: int):
        """The transformer's own loop from double block `start` on, with the same calls diffusers makes (same
        keyword arguments, so a compiled block finds the same graph), bit-identical to the uncached forward."""
        for block in self.transformer_blocks[start:]:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs)
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in self.single_transformer_blocks:
            hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=None,
                                  temb_mod=self.single_stream_mod, image_rotary_emb=block_kwargs["image_rotary_emb"],
                                  joint_attention_kwargs=block_kwargs["joint_attention_kwargs"])
        return hidden_states[:, :text_len], hidden_states[:, text_len:]


@contextlib.contextmanager
def _blocks_swapped(transformer, cached: torch.nn.Module):
    blocks, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
    transformer.transformer_blocks = torch.nn.ModuleList([cached])
    transformer.single_transformer_blocks = torch.nn.ModuleList()
    try:
        yield
    finally:
        transformer.transformer_blocks = blocks
        transformer.single_transformer_blocks = singles


class RotaryMemoHook(ModelHook):
    """Within a run the pipeline passes the same position-id tensors at every step, so their rotary embeddings are
    computed once: on small models that is a sizeable part of what a skipped step still costs. A hit needs the same
    storage, layout and values as a kept copy (ids are a few thousand integers: comparing is cheap). Values are
    compared rather than version counters because ComfyUI runs nodes in inference mode, whose tensors have none."""

    def __init__(self, capacity: int = 8):
        super().__init__()
        self.capacity = capacity
        self.memo: dict = {}

    def new_forward(self, module, ids):
        key = (ids.data_ptr(), ids.storage_offset(), tuple(ids.shape), ids.stride(), ids.dtype, ids.device)
        hit = self.memo.get(key)
        if hit is None or not torch.equal(hit[1], ids):
            if len(self.memo) >= self.capacity:
                self.memo.clear()
            # Holding ids keeps its storage from being reused by another tensor under the same key.
            hit = self.memo[key] = (ids, ids.clone(), self.fn_ref.original_forward(ids))
        return hit[2]


def rotary_memoized(pos_embed, capacity: int = 8):
    return hook_installed(pos_embed, RotaryMemoHook(capacity), ROTARY_MEMO_HOOK)


def sum_across_ranks(transformer):
    """Under diffusers' context parallelism (`enable_parallelism`), a function that sums a tensor over the ranks
    that share one branch's tokens (all ranks, or one CFG half of them); None otherwise. See
    CacheRun.sum_across_ranks."""
    config = getattr(transformer, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return None
    # diffusers' own (ring x ulysses) mesh of the ranks splitting one sequence, set up by enable_parallelism
    group = config.context_parallel_config._flattened_mesh.get_group()

    def summed(partial: torch.Tensor) -> torch.Tensor:
        total = partial.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    return summed


@contextlib.contextmanager
def installed(transformer, run: CacheRun, run_blocks):
    """A block-skipping method (`run_blocks`, see the module docs) on `transformer` for one run."""
    cached = Flux2CachedTransformerBlocks(transformer, run, run_blocks)
    run.sum_across_ranks = sum_across_ranks(transformer)

    def keep_single_stream_mod(module, inputs, output):
        cached.single_stream_mod = output

    def call(original_forward, branch: Branch, args, kwargs):
        if args or kwargs.get("kv_cache_mode") is not None:
            # Positional calls and the reference KV-cache modes (Flux2KleinKV) are not what this adapter mirrors:
            # run them uncached rather than guess.
            return original_forward(*args, **kwargs), False
        cached.branch = branch
        branch.skipped = False
        try:
            with _blocks_swapped(transformer, cached):
                output = original_forward(*args, **kwargs)
        finally:
            cached.branch = None
            cached.single_stream_mod = None
        return output, branch.skipped

    hook = transformer.single_stream_modulation.register_forward_hook(keep_single_stream_mod)
    try:
        with step_cache_installed(transformer, run, call), rotary_memoized(transformer.pos_embed):
            yield
    finally:
        hook.remove()
