"""Model configs read from tensor names and shapes (diffusers / Hugging Face layout), never from a hub.

The same rules cover FLUX.2 [dev], [klein] 4B/9B and the tiny random-weight models the tests build.
What shapes cannot tell (RoPE axes, norm groups, RoPE theta of a text encoder) follows the real models' conventions.
"""

from __future__ import annotations

import re

from ..errors import ModelFileError

# Text encoders FLUX.2 ships with, by (family, hidden size): which hidden states feed the transformer, and the
# settings shapes cannot reveal. Other sizes (tiny test models) use the quarter-depth rule and defaults.
KNOWN_TEXT_ENCODERS = {
    ("mistral", 5120): dict(out_layers=(10, 20, 30), head_dim=128, rope_theta=1e9, max_position_embeddings=131072),
    ("qwen3", 2560): dict(out_layers=(9, 18, 27), head_dim=128, rope_theta=1e6, max_position_embeddings=40960),
    ("qwen3", 4096): dict(out_layers=(9, 18, 27), head_dim=128, rope_theta=1e6, max_position_embeddings=40960),
}


def count_blocks(keys, pattern, name: str = "checkpoint") -> int:
    """How many numbered blocks (`pattern`'s group 1) the keys hold. Every index below the highest must be there:
    a gap (a header naming only block 9999) would otherwise make a model thousands of blocks deep."""
    found = {}
    for k in keys:
        if m := re.match(pattern, k):
            found.setdefault(int(m.group(1)), k)
    if not found:
        return 0
    n = max(found) + 1
    if len(found) != n:
        gap = min(set(range(n)) - set(found))
        raise ModelFileError(f"'{name}' has tensor '{found[n - 1]}' but no tensors of block {gap}: its numbered "
                             "blocks have a gap, so the file is incomplete or damaged.")
    return n


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
    num_layers = count_blocks(keys, r"transformer_blocks\.(\d+)\.", name)
    num_single = count_blocks(keys, r"single_transformer_blocks\.(\d+)\.", name)
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
    n_blocks = count_blocks(keys, r"encoder\.down_blocks\.(\d+)\.", name)
    if not n_blocks or "bn.running_mean" not in shapes:
        raise ModelFileError(f"'{name}' is not a FLUX.2 VAE (it has no latent batch-norm statistics); "
                             "FLUX.1/SD VAEs do not work with FLUX.2. Use flux2-vae.safetensors.")
    channels = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_blocks))
    decoder_channels = tuple(shapes[f"decoder.up_blocks.{n_blocks - 1 - i}.resnets.0.conv1.weight"][0]
                             for i in range(n_blocks))
    latent_channels = shapes["encoder.conv_out.weight"][0] // 2
    layers = count_blocks(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", name)
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


def text_encoder_widths(shapes: dict[str, tuple]) -> tuple[int, int, int, int, int]:
    """(vocabulary, hidden, q out, k/v out, MLP intermediate) of a text-only Mistral/Qwen3 layout from its tensor
    shapes; KeyError names the first tensor that is missing."""
    vocab, hidden = shapes["embed_tokens.weight"]
    return (vocab, hidden, shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0],
            shapes["layers.0.mlp.gate_proj.weight"][0])


def text_encoder_config(shapes: dict[str, tuple], family: str, name: str = "checkpoint") -> tuple[dict, tuple]:
    """(transformers config kwargs, hidden-state layers FLUX.2 reads) from text-only keys (`layers.N...`)."""
    try:
        vocab, hidden, q_out, kv_out, intermediate = text_encoder_widths(shapes)
    except KeyError as e:
        raise ModelFileError(f"'{name}' lacks tensor {e} that a Mistral/Qwen3 text encoder has.") from None
    layers = count_blocks(shapes.keys(), r"layers\.(\d+)\.", name)
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


# ---------------------------------------------------------------- a folder's config.json against its weights

def check_config_matches_weights(component: str, config: dict, shapes: dict[str, tuple], where: str) -> None:
    """Refuse a diffusers/transformers folder whose config.json disagrees with its weights' shapes (read from the
    safetensors headers), before the model is built: a config asking for more layers or wider layers than the
    weights hold would allocate a model of random weights, possibly tens of GB of them.

    `config` is the effective config (the class defaults under the file's own values), `shapes` the weights in
    diffusers / Hugging Face text-only layout, `where` the config file named in the error."""
    for field, said, held in _config_expectations(component, config, shapes, where):
        if not _same(said, held):
            raise ModelFileError(f"'{where}' does not match the weights next to it: {field} is {said!r} in the "
                                 f"config but the weights hold {held!r}. The folder mixes files of different models "
                                 "or its config was edited; download the folder again.")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is bool or type(b) is bool:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return a == b


def _config_expectations(component: str, config: dict, shapes: dict, where: str):
    """(config field, value in config, value the weights need) for every field the weights' shapes decide."""
    if component == "transformer":
        w = transformer_config(shapes, where)
        for field in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                      "joint_attention_dim", "timestep_guidance_channels", "guidance_embeds"):
            yield field, config.get(field), w[field]
        yield "out_channels", config.get("out_channels") or config.get("in_channels"), \
            w["out_channels"] or w["in_channels"]
        inner = w["num_attention_heads"] * w["attention_head_dim"]
        ratio = config.get("mlp_ratio")
        if not isinstance(ratio, (int, float)) or int(inner * ratio) != round(inner * w["mlp_ratio"]):
            yield "mlp_ratio", ratio, w["mlp_ratio"]
        axes = config.get("axes_dims_rope")
        if isinstance(axes, (list, tuple)) and all(isinstance(a, int) for a in axes):
            yield "sum of axes_dims_rope", sum(axes), w["attention_head_dim"]  # RoPE covers each head exactly
        else:
            yield "axes_dims_rope", axes, w["axes_dims_rope"]
    elif component == "vae":
        w = vae_config(shapes, where)
        for field in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                      "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            yield field, config.get(field), w[field]
        yield "decoder_block_out_channels", config.get("decoder_block_out_channels") or \
            config.get("block_out_channels"), w["decoder_block_out_channels"] or w["block_out_channels"]
        for field in ("down_block_types", "up_block_types"):
            types = config.get(field)
            yield f"the number of {field}", len(types) if isinstance(types, (list, tuple)) else types, \
                len(w["block_out_channels"])
        groups = config.get("norm_num_groups")
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in w["block_out_channels"]):
            yield "norm_num_groups", groups, f"a divisor of every block's channels {w['block_out_channels']}"
    else:
        try:
            vocab, hidden, q_out, kv_out, intermediate = text_encoder_widths(shapes)
        except KeyError as e:
            raise ModelFileError(f"The weights next to '{where}' lack tensor {e} that a Mistral/Qwen3 text encoder "
                                 "has; the folder is incomplete or of another model.") from None
        yield "vocab_size", config.get("vocab_size"), vocab
        yield "hidden_size", config.get("hidden_size"), hidden
        yield "intermediate_size", config.get("intermediate_size"), intermediate
        yield "num_hidden_layers", config.get("num_hidden_layers"), count_blocks(shapes, r"layers\.(\d+)\.", where)
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if isinstance(heads, int) and heads > 0 else None)
        if "layers.0.self_attn.q_norm.weight" in shapes:
            yield "head_dim", head_dim, shapes["layers.0.self_attn.q_norm.weight"][0]
        if not isinstance(head_dim, int) or head_dim < 1:
            yield "head_dim", head_dim, "a positive integer"
            return
        yield "num_attention_heads", heads, q_out / head_dim if q_out % head_dim else q_out // head_dim
        yield "num_key_value_heads", config.get("num_key_value_heads"), \
            kv_out / head_dim if kv_out % head_dim else kv_out // head_dim


def family_of(transformer) -> str:
    """[dev] embeds guidance; [klein] does not."""
    return "dev" if transformer.config.guidance_embeds else "klein"
