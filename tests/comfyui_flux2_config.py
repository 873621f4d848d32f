"""What each tested ComfyUI version reads from a FLUX.2 model config (its `unet_config`), and how its model detection
derives that config from a BFL-layout checkpoint's names and shapes. Recorded by reading ComfyUI's source; the
real-ComfyUI test `test_comfyui_native.py::test_recorded_flux2_config_is_what_comfyui_reads` checks this record
against the ComfyUI named by COMFYUI_DIR, so a new version that reads more fails there first.

The pack hands ComfyUI's own detection the names and shapes of its transformer (nodes/native_model.py
`flux2_model_config`); `tests/test_comfy_config.py` (CI, no ComfyUI) checks that those names and shapes make the
recorded detection yield every key below, with the model's own sizes.
"""

from __future__ import annotations

# comfy/ldm/flux/model.py `FluxParams`: the fields without a default (ComfyUI builds its network from these).
# The same 15 in 0.8.0 and 0.33.0.
FLUX_PARAMS_REQUIRED = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio",
                        "num_heads", "depth", "depth_single_blocks", "axes_dim", "theta", "patch_size", "qkv_bias",
                        "guidance_embed", "txt_ids_dims")

# The unet_config keys each version's FLUX.2 classes read without a default:
# - comfy/supported_models_base.py `BASE.matches`: the class's own unet_config keys (Flux2: image_model);
# - comfy/supported_models.py `Flux2.__init__`: 0.8.0 reads nothing; 0.33.0 reads hidden_size (memory estimate);
# - the network's parameters, FLUX_PARAMS_REQUIRED.
# (comfy/model_base.py `BaseModel.__init__` reads disable_unet_model_creation, dtype and adm_in_channels with
# defaults; model_base.Flux2 reads none.)
CONFIG_READS = {
    "0.8.0": frozenset({"image_model", *FLUX_PARAMS_REQUIRED}),
    "0.33.0": frozenset({"image_model", "hidden_size", *FLUX_PARAMS_REQUIRED}),
}
SUPPORTED_MODEL_READS = {"0.8.0": frozenset(), "0.33.0": frozenset({"hidden_size"})}  # Flux2.__init__ alone

# comfy/model_detection.py `detect_unet_config`, its FLUX.2 branch (the same rules in 0.8.0 and 0.33.0; 0.33.0 also
# accepts `.weight` for the norm scales). Keys whose presence makes it FLUX.2:
DETECTION_IDENTITY = ("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight",
                      "double_stream_modulation_img.lin.weight")
# keys it sets to FLUX.2's fixed values, whatever the checkpoint holds (num_heads: 48, or in 0.33.0 hidden_size //
# sum(axes_dim); vec_in_dim: None without `vector_in.in_layer.weight`):
DETECTION_FIXED = ("image_model", "axes_dim", "num_heads", "mlp_ratio", "theta", "out_channels", "global_modulation",
                   "mlp_silu_act", "qkv_bias", "ops_bias", "default_ref_method", "ref_index_scale", "txt_ids_dims",
                   "patch_size", "vec_in_dim")
# keys it reads from a weight's shape: key -> (weight, dimension)
DETECTION_SHAPES = {"hidden_size": ("img_in.weight", 0), "in_channels": ("img_in.weight", 1),
                    "context_in_dim": ("txt_in.weight", 1)}
# keys it counts blocks for: key -> prefix pattern
DETECTION_COUNTS = {"depth": "double_blocks.{}.", "depth_single_blocks": "single_blocks.{}."}
# keys it sets from a weight's presence: key -> weight
DETECTION_PRESENCE = {"guidance_embed": "guidance_in.in_layer.weight"}


def detected_keys(state_dict: dict) -> dict:
    """The config the recorded rules derive from `state_dict` (names -> tensors with shapes); {} when the names do
    not say FLUX.2. Only the keys whose values depend on the checkpoint get values; fixed ones map to None."""
    if not all(key in state_dict for key in DETECTION_IDENTITY):
        return {}
    config = dict.fromkeys(DETECTION_FIXED)
    for key, (weight, dim) in DETECTION_SHAPES.items():
        if weight in state_dict:
            config[key] = state_dict[weight].shape[dim]
    for key, pattern in DETECTION_COUNTS.items():
        count = 0
        while any(name.startswith(pattern.format(count)) for name in state_dict):
            count += 1
        config[key] = count
    for key, weight in DETECTION_PRESENCE.items():
        config[key] = weight in state_dict
    return config
