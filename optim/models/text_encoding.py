"""Prompt encoding for FLUX.2: Mistral 3 ([dev]) or Qwen3 ([klein]) hidden states stacked into conditioning.

The prompt formatting and layer stacking are diffusers' own (`Flux2Pipeline._get_mistral_3_small_prompt_embeds`,
`Flux2KleinPipeline._get_qwen3_prompt_embeds`), so embeddings match diffusers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError

MAX_SEQUENCE_LENGTH = 512  # diffusers' FLUX.2 pipelines always pad prompts to this length
# Conditioning width (three hidden layers stacked) -> encoder family: Mistral Small 3.1 for [dev] (3 x 5120), Qwen3-8B
# for klein-9B (3 x 4096), Qwen3-4B for klein-4B (3 x 2560).
FAMILY_BY_EMBED_WIDTH = {15360: "mistral", 12288: "qwen3", 7680: "qwen3"}


@dataclass(frozen=True, eq=False)
class Flux2Conditioning:
    """Prompt embeddings [B, L, D] plus where they came from. Immutable: nodes share it between branches."""

    prompt_embeds: torch.Tensor
    family: str  # "mistral" ([dev]) or "qwen3" ([klein])
    encoder_identity: str = ""
    prompts: tuple[str, ...] = field(default=())

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]


@dataclass(eq=False)
class TextEncoder:
    model: torch.nn.Module
    tokenizer: object
    family: str
    out_layers: tuple[int, ...]
    identity: str = ""

    @property
    def embed_dim(self) -> int:
        cfg = getattr(self.model.config, "text_config", self.model.config)
        return cfg.hidden_size * len(self.out_layers)

    @torch.no_grad()
    def encode(self, prompts, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Flux2Conditioning:
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.model.parameters()).device
        if self.family == "qwen3":
            embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                self.model, self.tokenizer, prompts, device=device, max_sequence_length=max_sequence_length,
                hidden_states_layers=self.out_layers)
        else:
            from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

            embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                self.model, self.tokenizer, prompts, device=device, max_sequence_length=max_sequence_length,
                system_message=SYSTEM_MESSAGE, hidden_states_layers=self.out_layers)
        return Flux2Conditioning(embeds, self.family, self.identity, tuple(prompts))


# ---------------------------------------------------------------- tokenizers for single-file encoders

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set txt = m['content'] %}{% else %}"
    "{% set txt = (m['content'] | selectattr('type','equalto','text') | map(attribute='text') | join('')) %}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ txt }}[/SYSTEM_PROMPT]{% else %}[INST]{{ txt }}[/INST]{% endif %}"
    "{% endfor %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _tokenizer_from_tekken(data: torch.Tensor):
    """Mistral's tekken vocabulary, which Comfy-Org embeds in its Mistral 3 files as the `tekken_model` tensor."""
    import tempfile

    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "tekken.json"
        vocab_file.write_bytes(data.numpy().tobytes())
        backend = MistralConverter(vocab_file=str(vocab_file)).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def load_tokenizer(ckpt, family: str, tokenizer_path=None):
    """The tokenizer for a single-file text encoder.

    Looked up in order: an explicit folder, a tokenizer embedded in the file (Comfy-Org's `tekken_model`), a
    folder next to the file named `<file stem>_tokenizer` or `tokenizer`.
    """
    from transformers import AutoTokenizer

    candidates = [Path(tokenizer_path)] if tokenizer_path else []
    if "tekken_model" in ckpt:
        return _tokenizer_from_tekken(ckpt.load(["tekken_model"])["tekken_model"])
    candidates += [ckpt.path.parent / f"{ckpt.path.stem}_tokenizer", ckpt.path.parent / "tokenizer"]
    for folder in candidates:
        if folder.is_dir():
            try:
                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as e:
                raise ModelFileError(f"Could not load the tokenizer in '{folder}': {e}") from e
            if not getattr(tok, "chat_template", None):
                tok.chat_template = QWEN_TEMPLATE if family == "qwen3" else MISTRAL_TEMPLATE
            return tok
    raise ModelFileError(
        f"No tokenizer found for '{ckpt.name}'. Put the model's tokenizer files (tokenizer.json, "
        f"tokenizer_config.json) in a folder named '{ckpt.path.stem}_tokenizer' next to it.")
