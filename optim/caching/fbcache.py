"""First Block Cache (and the block runner TeaCache shares) for diffusers' Flux2Transformer2DModel.

Built on para-attn's first-block-cache machinery: its CacheContext holds the buffers and step counter, its
`get_can_use_cache` / `set_*_residual` / `apply_prev_hidden_states_residual` make the decision and reuse the residual,
and `CachedTransformerBlocks` is the shape of the adapter. para-attn only ships a FLUX.1 adapter, and picks it for
FLUX.2 by name prefix, which passes FLUX.1 arguments to FLUX.2's single blocks. FLUX.2 differs in three ways that
this adapter handles:
- modulation is computed once per call, outside the blocks, and handed to every block (`temb_mod_img`/`temb_mod_txt`
  for the double-stream blocks, `temb_mod` for the single-stream blocks); the single-stream one is taken from the
  transformer's `single_stream_modulation` module as it runs (a forward hook), since the double-block loop never
  sees it;
- blocks take keyword arguments and double blocks return (encoder_hidden_states, hidden_states);
- after the blocks, the forward concatenates text and image tokens and keeps the image part; so only the image
  residual matters and no text residual is stored.

Like para-attn's FLUX.1 adapter, the forward runs with `transformer_blocks` replaced by one cached-blocks module
(which runs every block itself) and `single_transformer_blocks` by an empty list, for the duration of each call.
The blocks themselves are the transformer's own modules, so regionally compiled blocks stay compiled; the decision
between the first block and the rest is plain Python (para-attn's functions are `torch.compiler.disable`d), which
is the only graph break.
"""

from __future__ import annotations

import contextlib

import torch
from para_attn.first_block_cache import utils as fbc

from .runtime import Branch, CacheRun, forward_patched


class Flux2CachedTransformerBlocks(fbc.CachedTransformerBlocks):
    """Stands in for `transformer_blocks` during a call: the double-stream blocks, then the single-stream blocks,
    skipping all but the first (fbcache) or all of them (teacache) when the run's decision says so."""

    def __init__(self, transformer, run: CacheRun):
        super().__init__(transformer.transformer_blocks, transformer.single_transformer_blocks, transformer=None,
                         return_hidden_states_first=False)
        self.run = run
        self.single_stream_mod: torch.Tensor | None = None
        self.branch: Branch | None = None

    # Called by Flux2Transformer2DModel.forward exactly as it calls a double-stream block.
    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                joint_attention_kwargs=None):
        block_kwargs = dict(temb_mod_img=temb_mod_img, temb_mod_txt=temb_mod_txt, image_rotary_emb=image_rotary_emb,
                            joint_attention_kwargs=joint_attention_kwargs)
        if self.run.settings.method == "teacache":
            return self._teacache(hidden_states, encoder_hidden_states, block_kwargs)
        return self._first_block_cache(hidden_states, encoder_hidden_states, block_kwargs)

    def _first_block_cache(self, hidden_states, encoder_hidden_states, block_kwargs):
        branch = self.branch
        with fbc.cache_context(branch.fbc):
            before_first = hidden_states
            encoder_hidden_states, hidden_states = self.transformer_blocks[0](
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs)
            first_residual = hidden_states - before_first
            del before_first
            fbc.mark_step_begin()
            skip = self.run.may_skip(branch) and fbc.get_can_use_cache(first_residual)
            torch._dynamo.graph_break()
            if skip:
                del first_residual
                hidden_states, _ = fbc.apply_prev_hidden_states_residual(hidden_states)
            else:
                fbc.set_first_hidden_states_residual(first_residual)
                del first_residual
                after_first = hidden_states
                encoder_hidden_states, hidden_states = self._remaining_blocks(
                    hidden_states, encoder_hidden_states, block_kwargs, start=1)
                fbc.set_hidden_states_residual(hidden_states - after_first)
            torch._dynamo.graph_break()
        branch.skipped = skip
        return encoder_hidden_states, hidden_states

    def _teacache(self, hidden_states, encoder_hidden_states, block_kwargs):
        from .teacache import decide, modulated_input

        branch = self.branch
        modulated = modulated_input(self.transformer_blocks[0], hidden_states, block_kwargs["temb_mod_img"])
        skip = decide(self.run, branch, modulated)
        torch._dynamo.graph_break()
        if skip:
            hidden_states = (hidden_states + branch.residual).contiguous()
        else:
            before = hidden_states
            encoder_hidden_states, hidden_states = self._remaining_blocks(
                hidden_states, encoder_hidden_states, block_kwargs, start=0)
            branch.residual = hidden_states - before
        torch._dynamo.graph_break()
        branch.skipped = skip
        return encoder_hidden_states, hidden_states

    def _remaining_blocks(self, hidden_states, encoder_hidden_states, block_kwargs, start: int):
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


def _new_branch_state(run: CacheRun, branch: Branch) -> None:
    if branch.fbc is None:
        branch.fbc = fbc.create_cache_context(residual_diff_threshold=run.settings.threshold,
                                              num_inference_steps=run.total_steps or -1)


@contextlib.contextmanager
def _rotary_memoized(pos_embed, capacity: int = 8):
    """Within a run the pipeline passes the same position-id tensors at every step, so their rotary embeddings are
    computed once: on small models that is a sizeable part of what a skipped step still costs. A hit needs the same
    storage, layout and values as a kept copy (ids are a few thousand integers: comparing is cheap). Values are
    compared rather than version counters because ComfyUI runs nodes in inference mode, whose tensors have none."""
    original = pos_embed.forward
    previous = pos_embed.__dict__.get("forward")
    memo: dict = {}

    def forward(ids):
        key = (ids.data_ptr(), ids.storage_offset(), tuple(ids.shape), ids.stride(), ids.dtype, ids.device)
        hit = memo.get(key)
        if hit is None or not torch.equal(hit[1], ids):
            if len(memo) >= capacity:
                memo.clear()
            # Holding ids keeps its storage from being reused by another tensor under the same key.
            hit = memo[key] = (ids, ids.clone(), original(ids))
        return hit[2]

    pos_embed.forward = forward
    try:
        yield
    finally:
        if previous is None:
            pos_embed.__dict__.pop("forward", None)
        else:
            pos_embed.forward = previous


@contextlib.contextmanager
def installed(transformer, run: CacheRun):
    """First Block Cache or TeaCache on `transformer` for one run."""
    cached = Flux2CachedTransformerBlocks(transformer, run)

    def keep_single_stream_mod(module, inputs, output):
        cached.single_stream_mod = output

    def call(original_forward, branch: Branch, args, kwargs):
        if args or kwargs.get("kv_cache_mode") is not None:
            # Positional calls and the reference KV-cache modes (Flux2KleinKV) are not what this adapter mirrors:
            # run them uncached rather than guess.
            return original_forward(*args, **kwargs), False
        _new_branch_state(run, branch)
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
        with forward_patched(transformer, run, call), _rotary_memoized(transformer.pos_embed):
            yield
    finally:
        hook.remove()
