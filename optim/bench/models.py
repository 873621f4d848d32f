"""What the benchmark runs on: random-weight FLUX.2 parts of a named size, built the same way for every row.

Every row gets its own transformer (so one row's precision, adapters or compiled code cannot leak into the next and
each row's memory is its own), rebuilt from the same seed on the same device, so all rows start from identical
weights. Real sizes are built directly on the target device in bf16: [dev] at fp32 on the CPU first would need 128 GB.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..models.tiny import SMALL, TINY, TINY_KLEIN, ComponentSpec
from .settings import CONFIG_NAMES

# The real members of the family (shapes from the shipped configs; /work/shared/recipes/README.txt). The text width
# is the encoder's hidden size: joint_attention_dim is three of its layers stacked (3 x 2560 = 7680 for klein-4B's
# Qwen3-4B, 3 x 4096 for klein-9B's Qwen3-8B, 3 x 5120 for [dev]'s Mistral Small 3.1).
_REAL_VAE = (128, 256, 512, 512)
KLEIN_4B = ComponentSpec(family="klein", num_layers=5, num_single_layers=20, attention_head_dim=128,
                         num_attention_heads=24, latent_channels=32, vae_block_out_channels=_REAL_VAE,
                         text_hidden_size=2560)
KLEIN_9B = dataclasses.replace(KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32,
                               text_hidden_size=4096)
DEV = dataclasses.replace(KLEIN_4B, family="dev", num_layers=8, num_single_layers=48, num_attention_heads=48,
                          text_hidden_size=5120)

CONFIGS: dict[str, ComponentSpec] = {"tiny": TINY, "tiny-klein": TINY_KLEIN, "small": SMALL, "klein-4b": KLEIN_4B,
                                     "klein-9b": KLEIN_9B, "dev": DEV}
REAL_CONFIGS = ("klein-4b", "klein-9b", "dev")
if tuple(CONFIGS) != CONFIG_NAMES:  # the names --help lists (settings.py) are the configs that exist
    raise ImportError("optim/bench/settings.py CONFIG_NAMES must list models.CONFIGS' names, in order")

# FLUX.2's shipped scheduler (scheduler/scheduler_config.json). The baseline builds its own scheduler from these
# values, so the pack's scheduler is checked against them by `pack-bf16` being bit-identical to `baseline`.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")

LORA_RANK = 16


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """How to build the bench's parts; `transformer()` returns a fresh, identical module on every call."""

    name: str
    spec: ComponentSpec
    device: torch.device
    seed: int = 0

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def real_vae(self) -> bool:
        return self.name in REAL_CONFIGS

    def transformer(self) -> torch.nn.Module:
        """The random-weight transformer in bf16 on the device, as the pack's loader hands it over."""
        from diffusers import Flux2Transformer2DModel

        with _default_dtype(torch.bfloat16), torch.device(self.device):
            _seed_everything(self.seed)
            model = Flux2Transformer2DModel(**self.spec.transformer_config())
        return model.eval().requires_grad_(False)

    def vae(self) -> torch.nn.Module:
        """Decodes latents for the fidelity check only (never timed): float32 on the CPU, where bf16 convolutions are
        tens of times slower, bf16 on a GPU."""
        from diffusers import AutoencoderKLFlux2

        from ..models.tiny import build_vae

        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        if not self.real_vae:
            return build_vae(self.spec, seed=self.seed + 1).to(self.device, dtype)
        with _default_dtype(dtype), torch.device(self.device):
            _seed_everything(self.seed + 1)
            vae = AutoencoderKLFlux2()  # the defaults are the real FLUX.2 VAE
        return vae.eval().requires_grad_(False)

    def prompt_embeds(self, tokens: int) -> torch.Tensor:
        """Seeded stand-in for a text encoder's output [1, tokens, joint_attention_dim] (float32, CPU)."""
        g = torch.Generator().manual_seed(self.seed + 2)
        return torch.randn(1, tokens, 3 * self.spec.text_hidden_size, generator=g)

    def write_lora(self, path: Path, rank: int = LORA_RANK) -> Path:
        """A random diffusers-layout LoRA over every Linear layer of the blocks, written as .safetensors.

        Its delta is about 5% of the size of the weights it adds to (nn.Linear's init has std 1/sqrt(3 in)): enough
        to move the output visibly, small enough to keep it sane."""
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(self.seed + 3)
        tensors = {}
        for name, (out_features, in_features) in _block_linear_shapes(self.spec).items():
            a = torch.randn(rank, in_features, generator=g) / math.sqrt(in_features)
            b = torch.randn(out_features, rank, generator=g) * (0.05 / math.sqrt(3 * rank))
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path))
        return path


def _block_linear_shapes(spec: ComponentSpec) -> dict[str, tuple[int, int]]:
    """Linear layers inside the blocks, by name, from a meta-device model (no memory, any size)."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**spec.transformer_config())
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and "blocks." in name}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)
