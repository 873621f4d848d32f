"""Random-weight FLUX.2 components of any size, for the demo, the benchmark and the tests.

Nothing here reaches a hub: the tokenizer is a word-level vocabulary built in memory with the same chat
templates the real Mistral / Qwen3 tokenizers apply, so the real encoding code runs on it unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set txt = m['content'] %}{% else %}"
    "{% set txt = (m['content'] | selectattr('type','equalto','text') | map(attribute='text') | join(' ')) %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT] {{ txt }} [/SYSTEM_PROMPT]{% else %}[INST] {{ txt }} [/INST]{% endif %}"
    "{% endfor %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and not enable_thinking %}<think> </think> {% endif %}{% endif %}"
)
_WORDS = (
    "a an the of and with in on at to is are dog cat cats dogs red green blue yellow house tree sky photo "
    "painting portrait of woman man city street night day sun moon mountain river forest car cars flower "
    "dancing running sitting standing big small old new bright dark , . you ai that reasons about image "
    "descriptions give structured responses focusing object relationships attribution actions without speculation"
).split()


@dataclass(frozen=True)
class ComponentSpec:
    """Sizes of a random-weight FLUX.2 family member. `family` is "dev" (Mistral 3) or "klein" (Qwen3)."""

    family: str = "dev"
    num_layers: int = 1
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (32, 32, 32, 32)
    text_hidden_size: int = 32
    text_layers: int = 4
    text_heads: int = 1
    text_head_dim: int = 32

    @property
    def guidance_embeds(self) -> bool:
        return self.family == "dev"

    @property
    def text_out_layers(self) -> tuple[int, ...]:
        n = self.text_layers
        return (n // 4, n // 2, 3 * n // 4)

    def transformer_config(self) -> dict:
        return dict(
            patch_size=1,
            in_channels=4 * self.latent_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=3 * self.text_hidden_size,
            timestep_guidance_channels=256,
            axes_dims_rope=(self.attention_head_dim // 4,) * 4,
            guidance_embeds=self.guidance_embeds,
        )


TINY = ComponentSpec()
TINY_KLEIN = dataclasses.replace(TINY, family="klein")
# Big enough that per-step transformer work dominates Python overhead on 2 CPU cores (the blocks are 96% of a step),
# with the real models' proportions: many single-stream blocks per double-stream one (klein-4B 5+20, [dev] 8+48), so
# the first block is a small share of a step, as First Block Cache assumes.
SMALL = ComponentSpec(num_layers=2, num_single_layers=18, attention_head_dim=64, num_attention_heads=4,
                      text_hidden_size=64, text_layers=4, text_heads=1, text_head_dim=64)


def _cast(module, dtype):
    return module if dtype == torch.float32 else module.to(dtype)


def build_transformer(spec: ComponentSpec = TINY, seed: int = 0, dtype=torch.float32):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return _cast(Flux2Transformer2DModel(**spec.transformer_config()), dtype).eval()


def build_vae(spec: ComponentSpec = TINY, seed: int = 0, dtype=torch.float32):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    n = len(spec.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_block_out_channels, layers_per_block=1,
        latent_channels=spec.latent_channels, norm_num_groups=32, sample_size=64,
    )
    # Non-trivial batch-norm statistics, so a wrong (de)normalisation cannot pass unnoticed.
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return _cast(vae, dtype).eval()


def build_tokenizer(family: str = "dev"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "dev":
        specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    else:
        specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system",
                    "<think>", "</think>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + _WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "dev":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
        tok.chat_template = MISTRAL_CHAT_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                      eos_token="<|im_end|>")
        tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_text_encoder(spec: ComponentSpec = TINY, seed: int = 0, dtype=torch.float32):
    """Mistral3ForConditionalGeneration for dev, Qwen3ForCausalLM for klein, as diffusers' pipelines use."""
    torch.manual_seed(seed)
    vocab_size = len(build_tokenizer(spec.family))
    text = dict(vocab_size=vocab_size, hidden_size=spec.text_hidden_size, intermediate_size=2 * spec.text_hidden_size,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_heads, head_dim=spec.text_head_dim, max_position_embeddings=1024,
                rms_norm_eps=1e-5 if spec.family == "dev" else 1e-6)  # Mistral Small 3.1 / Qwen3 values
    if spec.family == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        cfg = Mistral3Config(
            text_config={"model_type": "mistral", **text, "rope_theta": 1e9, "sliding_window": None,
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
            vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "intermediate_size": 32, "image_size": 30, "patch_size": 6,
                           "num_channels": 3},
            bos_token_id=1, eos_token_id=2, pad_token_id=3, image_seq_length=4, vision_feature_layer=-1,
            image_token_index=8)
        model = Mistral3ForConditionalGeneration(cfg)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**text, rope_theta=1e6, pad_token_id=1, tie_word_embeddings=True))
    return _cast(model, dtype).eval()


@dataclass
class TinyComponents:
    spec: ComponentSpec
    transformer: object
    vae: object
    text_encoder: object
    tokenizer: object


def build_components(spec: ComponentSpec = TINY, seed: int = 0, dtype=torch.float32) -> TinyComponents:
    return TinyComponents(spec, build_transformer(spec, seed, dtype), build_vae(spec, seed + 1, dtype),
                          build_text_encoder(spec, seed + 2, dtype), build_tokenizer(spec.family))


def forward_inputs(model, height: int = 64, width: int = 64, text_tokens: int = 16, batch: int = 1,
                   seed: int = 0) -> dict:
    """Keyword arguments for one Flux2Transformer2DModel forward at a latent size of height/16 x width/16, on the
    model's device and in its dtype."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // 16, width // 16
    cfg = model.config
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
    kwargs = dict(
        hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.expand(batch, -1, -1), txt_ids=txt_ids.expand(batch, -1, -1))
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 4.0)
    parameter = next(model.parameters())
    kwargs = {k: v.to(parameter.device, parameter.dtype if v.is_floating_point() else v.dtype)
              for k, v in kwargs.items()}
    return {**kwargs, "return_dict": False}
