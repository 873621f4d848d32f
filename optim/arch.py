"""Model configs read from tensor names and shapes (diffusers / Hugging Face layout), never from a hub.

The same rules cover FLUX.2 [dev], [klein] 4B/9B and the tiny random-weight models the tests build.
What shapes cannot tell (RoPE axes, norm groups, RoPE theta of a text encoder) follows the real models' conventions.
"""

from __future__ import annotations

import re

from .errors import ModelFileError

# Text encoders FLUX.2 ships with, by (family, hidden size): which hidden states feed the transformer, and the
# settings shapes cannot reveal. Other sizes (tiny test models) use the quarter-depth rule and defaults.
KNOWN_TEXT_ENCODERS = {
    ("mistral", 5120): dict(out_layers=(10, 20, 30), head_dim=128, rope_theta=1e9, max_position_embeddings=131072),
    ("qwen3", 2560): dict(out_layers=(9, 18, 27), head_dim=128, rope_theta=1e6, max_position_embeddings=40960),
    ("qwen3", 4096): dict(out_layers=(9, 18, 27), head_dim=128, rope_theta=1e6, max_position_embeddings=40960),
}


def _count(keys, pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def transformer_config(shapes: dict[str, tuple], name: str = "checkpoint") -> dict:
    """Flux2Transformer2DModel kwargs from a diffusers-layout state dict's shapes."""
    try:
        inner, in_channels = shapes["x_embedder.weight"]
        _, joint = shapes["context_embedder.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if "transformer_blocks.0.attn.norm_q.weight" \
            in shapes else shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
        tg_channels = shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1]
        out_features = shapes["proj_out.weight"][0]
    except KeyError as e:
        raise ModelFileError(f"'{name}' lacks tensor {e} that every FLUX.2 transformer has; "
                             "the file is incomplete or not a FLUX.2 diffusion model.") from None
    keys = shapes.keys()
    num_layers = _count(keys, r"transformer_blocks\.(\d+)\.")
    num_single = _count(keys, r"single_transformer_blocks\.(\d+)\.")
    if "transformer_blocks.0.ff.linear_in.weight" in shapes:
        mlp_hidden = shapes["transformer_blocks.0.ff.linear_in.weight"][0] // 2
    else:
        mlp_hidden = (shapes["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"][0] - 3 * inner) // 2
    return dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_features if out_features != in_channels else None,
        num_layers=num_layers,
        num_single_layers=num_single,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=joint,
        timestep_guidance_channels=tg_channels,
        mlp_ratio=mlp_hidden / inner,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
    )


def vae_config(shapes: dict[str, tuple], name: str = "checkpoint") -> dict:
    """AutoencoderKLFlux2 kwargs from a diffusers-layout state dict's shapes."""
    keys = shapes.keys()
    n_blocks = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    if not n_blocks or "bn.running_mean" not in shapes:
        raise ModelFileError(f"'{name}' is not a FLUX.2 VAE (it has no latent batch-norm statistics); "
                             "FLUX.1/SD VAEs do not work with FLUX.2. Use flux2-vae.safetensors.")
    channels = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks))
    decoder_channels = tuple(shapes[f"decoder.up_blocks.{n_blocks - 1 - i}.resnets.0.conv1.weight"][0]
                             for i in range(n_blocks))
    latent_channels = shapes["encoder.conv_out.weight"][0] // 2
    layers = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return dict(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=channels,
        decoder_block_out_channels=None if decoder_channels == channels else decoder_channels,
        layers_per_block=layers,
        latent_channels=latent_channels,
        norm_num_groups=32,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
    )


def text_encoder_config(shapes: dict[str, tuple], family: str, name: str = "checkpoint") -> tuple[dict, tuple]:
    """(transformers config kwargs, hidden-state layers FLUX.2 reads) from text-only keys (`layers.N...`)."""
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        q_out = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_out = shapes["layers.0.self_attn.k_proj.weight"][0]
        intermediate = shapes["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as e:
        raise ModelFileError(f"'{name}' lacks tensor {e} that a Mistral/Qwen3 text encoder has.") from None
    layers = _count(shapes.keys(), r"layers\.(\d+)\.")
    known = KNOWN_TEXT_ENCODERS.get((family, hidden), {})
    if "layers.0.self_attn.q_norm.weight" in shapes:
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    else:
        head_dim = known.get("head_dim") or (128 if q_out % 128 == 0 else q_out)
    out_layers = text_out_layers(family, hidden, layers, name)
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=q_out // head_dim, num_key_value_heads=kv_out // head_dim, head_dim=head_dim,
               rms_norm_eps=1e-5 if family == "mistral" else 1e-6,
               rope_theta=known.get("rope_theta", 1e9 if family == "mistral" else 1e6),
               max_position_embeddings=known.get("max_position_embeddings", 1024))
    return cfg, tuple(out_layers)


def text_out_layers(family: str, hidden: int, num_layers: int, name: str = "checkpoint") -> tuple[int, ...]:
    """The hidden states FLUX.2 stacks into its text conditioning: fixed for shipped encoders, quarters otherwise."""
    known = KNOWN_TEXT_ENCODERS.get((family, hidden), {})
    out_layers = known.get("out_layers") or (num_layers // 4, num_layers // 2, 3 * num_layers // 4)
    if max(out_layers) > num_layers or min(out_layers) < 1:
        raise ModelFileError(f"'{name}' has {num_layers} layers; FLUX.2 reads hidden states {out_layers} from it.")
    return tuple(out_layers)
