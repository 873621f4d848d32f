"""Context parallelism: one image's tokens split over the ranks of a torch.distributed group, through diffusers' own
`enable_parallelism` and `ContextParallelConfig` (Ulysses all-to-all, or ring attention).

`ModelHandle.parallel` holds `ParallelSettings` (the Parallel node's widgets: gpus, mode). The actor group in
`optim.parallel` resolves them for a run into a `RankLayout` and hands each rank the handle with that layout; inside a
rank, this feature switches the transformer to it. diffusers cannot switch parallelism off again, so a transformer
keeps its layout for its life: the group only ever asks one layout of the modules it loaded (another layout is a new
group), and a second, different one is refused here rather than half-applied.

What differs from diffusers' shipped plan for Flux2Transformer2DModel (`_cp_plan`): the image tokens are gathered
after `norm_out` instead of after `proj_out`, so `proj_out` sees the whole sequence. A LoRA on `proj_out` wraps that
module (peft replaces it with a LoRA layer around the original); with the gather on the original, the LoRA branch
would add its shard-sized delta to the gathered output. `proj_out` is one linear layer on the image tokens: running
it unsplit costs little.

CFG splitting (`RankLayout.cfg == 2`): a [klein] base run with a negative prompt calls the transformer twice a step,
once per branch. Split, the ranks form a (cfg, ring, ulysses) device mesh: the first half of the ranks computes the
positive branch, the second half the negative one (each half splitting its branch's tokens when it has more than one
rank), and each rank hands its half's output to its partner in the other half, so all ranks return the same guided
velocity. The pipeline then runs as a one-branch pipeline: `CfgSplitHook` does the branch's second call and the
pipeline's own guidance formula on every call.

CPU ranks (gloo): diffusers divides by `torch.accelerator.device_count()` when it sets up the mesh, which is 0 on a
machine without an accelerator; `cpu_device_count_patched` reports 1 there while parallelism is enabled.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from diffusers import ContextParallelConfig, Flux2KleinPipeline
from diffusers.hooks import ModelHook
from diffusers.models._modeling_parallel import ContextParallelOutput  # not re-exported by diffusers 0.42

from ..errors import InputError
from .api import Feature, RunReport, feature_state
from .caching.transformer_hook import installed
from .parallel_settings import ParallelSettings

NAME = "parallel"


@dataclass(frozen=True)
class RankLayout:
    """How the ranks of one run split it: CFG branches x ring degree x Ulysses degree = ranks."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1  # 2: the two CFG branches on two halves of the ranks

    @property
    def ranks(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence_degree(self) -> int:
        """The ranks one branch's tokens are split over."""
        return self.ulysses * self.ring

    @property
    def context_parallel(self) -> bool:
        return self.sequence_degree > 1


def cfg_splittable(settings: ParallelSettings, cfg_run: bool) -> bool:
    """Whether a run is split by CFG branch: `cfg_run` (a [klein] base run with a negative prompt and guidance above
    1) under mode cfg, or under auto with an even GPU count. Known before any model loads, so the actor group is
    chosen by it."""
    return cfg_run and (settings.mode == "cfg" or (settings.mode == "auto" and settings.gpus % 2 == 0))


def resolve_layout(settings: ParallelSettings, transformer_config, cfg_run: bool = False) -> RankLayout:
    """The layout `settings` ask for on a transformer with `transformer_config`, for a run that does CFG or not
    (`cfg_run`). A split the model or the run cannot take is refused with its numbers."""
    settings.validate()
    if settings.mode == "cfg" and not cfg_run:
        raise InputError("parallel mode 'cfg' splits the two branches of a [klein] base run with a negative prompt "
                         "and guidance above 1, and this run has only one branch: connect a negative prompt, or use "
                         "mode 'ulysses' or 'auto'.")
    cfg = 2 if cfg_splittable(settings, cfg_run) else 1
    n, heads = settings.gpus // cfg, int(transformer_config.num_attention_heads)
    if n == 1:
        return RankLayout(cfg=cfg)
    if settings.mode == "ring" or (settings.mode in ("auto", "cfg") and heads % n):
        return RankLayout(ring=n, cfg=cfg)
    if heads % n:
        raise InputError(f"parallel mode 'ulysses' splits the {heads} attention heads over {n} GPUs, and {heads} is "
                         f"not divisible by {n}: use mode 'ring' (or 'auto'), or a GPU count that divides {heads}.")
    return RankLayout(ulysses=n, cfg=cfg)


def context_parallel_plan(transformer) -> dict:
    """diffusers' own plan for the transformer, with the gather moved from `proj_out` to `norm_out` (module docs)."""
    plan = dict(type(transformer)._cp_plan)
    output = plan.pop("proj_out")
    if not isinstance(output, ContextParallelOutput):
        raise InputError(f"{type(transformer).__name__}'s context-parallel plan gathers at proj_out in a way this "
                         "pack does not know; update flux2-accel.")
    plan["norm_out"] = output
    return plan


@contextlib.contextmanager
def cpu_device_count_patched():
    """diffusers sets up its device mesh with `torch.accelerator.device_count()` as a divisor: 0 without an
    accelerator. CPU ranks hold one device each, the CPU."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def sequence_tokens_check(layout: RankLayout, tokens: int, what: str) -> None:
    """diffusers splits the sequence evenly: each part must divide by the context-parallel degree."""
    degree = layout.sequence_degree
    if degree > 1 and tokens % degree:
        raise InputError(f"parallel: the {what} has {tokens} tokens, which do not split evenly over {degree} ranks; "
                         f"choose a size (or text length) whose token count divides by {degree}.")


MESH_DIMS = ("cfg", "ring", "ulysses")  # diffusers reads the "ring" and "ulysses" dimensions of a mesh it is given


@functools.lru_cache(maxsize=1)  # one layout per rank process: a group with another layout has new processes
def device_mesh(layout: RankLayout):
    """The (cfg, ring, ulysses) mesh over the default process group: ranks [0, n/2) compute the positive branch."""
    if not torch.distributed.is_initialized():
        raise InputError("a parallel model runs inside its actor group: sample it with the pack's sampler or "
                         "`flux2-accel generate --gpus N`, which start the group.")
    world = torch.distributed.get_world_size()
    if world != layout.ranks:
        raise InputError(f"parallel: this process group has {world} ranks and the layout needs {layout.ranks}.")
    with cpu_device_count_patched():
        return torch.distributed.device_mesh.init_device_mesh(
            torch._C._get_accelerator().type, (layout.cfg, layout.ring, layout.ulysses), mesh_dim_names=MESH_DIMS)


def enable(transformer, layout: RankLayout) -> None:
    """Switch `transformer` to `layout`'s context parallelism over its `device_mesh`, once."""
    config = ContextParallelConfig(ulysses_degree=layout.ulysses if layout.ulysses > 1 else None,
                                   ring_degree=layout.ring if layout.ring > 1 else None, mesh=device_mesh(layout))
    with cpu_device_count_patched():
        transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(transformer))


CFG_SPLIT_HOOK = "flux2_accel_cfg_split"


class CfgSplitHook(ModelHook):
    """Both CFG branches of every transformer call, split over the mesh's cfg dimension (module docs).

    The pipeline calls with the positive branch's inputs. The negative half of the ranks swaps in the negative prompt
    (repeated over the batch and given text ids as the pipeline would), every rank computes its own branch, the two
    halves swap outputs, and every rank returns `negative + guidance * (positive - negative)` in float32, as the
    pipeline combines its two calls."""

    def __init__(self, negative_embeds: torch.Tensor, guidance: float, mesh):
        super().__init__()
        self.negative_embeds = negative_embeds
        self.guidance = float(guidance)
        self.group = mesh["cfg"].get_group()
        self.negative_branch = mesh["cfg"].get_local_rank() == 1

    def new_forward(self, module, *args, **kwargs):
        if self.negative_branch:
            positive = kwargs["encoder_hidden_states"]
            negative = self.negative_embeds.to(positive.device, positive.dtype)
            per_prompt = positive.shape[0] // negative.shape[0]
            negative = negative.repeat(1, per_prompt, 1).view(positive.shape[0], negative.shape[1], -1)
            kwargs["encoder_hidden_states"] = negative
            kwargs["txt_ids"] = Flux2KleinPipeline._prepare_text_ids(negative).to(kwargs["txt_ids"].device)
        output = self.fn_ref.original_forward(*args, **kwargs)
        mine = (output[0] if isinstance(output, tuple) else output.sample).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        torch.distributed.all_gather(both, mine, group=self.group)
        positive, negative = (t.float() for t in both)
        guided = negative + self.guidance * (positive - negative)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output


def cfg_split(transformer, layout: RankLayout, negative_embeds: torch.Tensor, guidance: float):
    """`CfgSplitHook` on `transformer` for one run."""
    return installed(transformer, CfgSplitHook(negative_embeds, guidance, device_mesh(layout)), CFG_SPLIT_HOOK)


@dataclass
class _Enabled:
    layout: RankLayout | None = None


@contextlib.contextmanager
def activate(store, transformer, handle, report: RunReport):
    layout = getattr(handle, "parallel", None)
    if not isinstance(layout, RankLayout):
        # A handle carries ParallelSettings until the group resolves them: a plain run of it is a run on one device.
        if getattr(transformer, "_parallel_config", None) is not None:
            raise InputError("this transformer was switched to context parallelism in this process and cannot run "
                             "without it: load it again in a process of its own.")
        yield
        return
    state = feature_state(store, handle.base_key, NAME, transformer, _Enabled)
    if layout.context_parallel:
        if state.layout is None:
            enable(transformer, layout)
            state.layout = layout
        elif state.layout != layout:
            raise InputError(f"parallel: this transformer runs with {state.layout} and cannot switch to {layout} "
                             "(diffusers cannot undo parallelism): the group is rebuilt for a new layout.")
    report.stats[NAME] = {"ulysses": layout.ulysses, "ring": layout.ring, "cfg": layout.cfg}
    yield


FEATURE = Feature(NAME, activate)
