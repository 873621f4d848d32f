"""Weight precision of loaded models: bf16, fp8 (stored e4m3fn with per-row scales) and nf4 (bitsandbytes 4-bit).

Every precision is applied the same way: each `nn.Linear` outside the keep-list is swapped for a quantized layer
(`Fp8Linear` or bitsandbytes' `Linear4bit`); everything else (embedders, norms, the final projection, modulation)
stays bf16. Layers that already arrive quantized from a pre-quantized checkpoint are converted in place to the
requested precision, so an fp8 file loaded at fp8 is never requantized and at bf16 is dequantized layer by layer.

Quantizing needs no GPU: fp8 is plain torch, nf4 uses bitsandbytes' own `Linear4bit`, which runs on CPU (diffusers'
`BitsAndBytesConfig` refuses without a GPU, so it is not used here).

Choices backed by measurement (tests/test_precision.py, README "Precision"):
- fp8 keeps one float32 scale per output row (`e4m3fn` saturates at 448 and has only 3 mantissa bits, so small
  weights would fall into subnormals without a scale; diffusers' layerwise casting stores unscaled fp8);
- nf4 uses double quantization (the per-block absmax is itself quantized): 0.047 fewer bytes per weight ([dev]:
  19.3 -> 17.8 GB), output error unchanged (rel L2 0.0076 either way on a 2+4-block test model).
  `apply_precision(..., double_quant=False)` turns it off;
- the shared modulation layers stay bf16: 1.8% of [dev]'s weights, read by every block; quantizing them raised the
  output deviation on that model by 4% (fp8) and 9% (nf4). Quantizing the embedders and final layers too multiplied
  it by 8 (fp8) and 17 (nf4).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..options import TEXT_ENCODER_PRECISIONS, TRANSFORMER_PRECISIONS
from .checkpoint import MappedCheckpoints, return_free_heap

log = logging.getLogger("flux2_accel")


# Linear layers that stay bf16 whatever the precision, named by a dotted part of their module path.
# Only nn.Linear layers are ever quantized, so norms and embedding tables are bf16 without being listed.
TRANSFORMER_KEEP_BF16 = (
    "x_embedder", "context_embedder", "time_guidance_embed",  # input embedders
    "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",  # modulation
    "norm_out", "proj_out",  # final adaLN and output projection
)
TEXT_ENCODER_KEEP_BF16 = ("embed_tokens", "lm_head", "vision_tower", "multi_modal_projector")

COMPUTE_DTYPE = torch.bfloat16
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: e4m3fn saturates there
NF4_BLOCKSIZE = 64
# Rows quantized at once: bounds the float32 scratch for [dev]'s largest layer (6144 x 55296) to ~64 MB.
_QUANT_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------- fp8 layer

def fast_fp8_supported(device: torch.device | str | None = None) -> bool:
    """fp8 matmuls (`torch._scaled_mm`) need CUDA compute capability 8.9 (Ada) or newer."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (float8_e4m3fn [N, K], float32 scale [N]) with weight ~= q * scale[:, None]."""
    q = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    rows = max(1, _QUANT_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows].float()
        s = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q[start:start + rows] = (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start:start + rows] = s
    return q, scale


class Fp8Linear(torch.nn.Module):
    """A Linear layer whose weight is stored as float8_e4m3fn with one float32 scale per output row.

    `forward` upcasts the weight to the input's dtype and applies the row scales to the output (the same algebra as
    scaling the weight, without a second weight-sized temporary). With `fast=True` the matmul itself runs in fp8
    (`torch._scaled_mm`, per-tensor dynamic scaling of the input), which needs compute capability 8.9+ on CUDA.
    State dict: `weight` (fp8), `weight_scale` (float32 [out]), `bias` (bf16, optional).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, fast: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fast = in_features, out_features, fast
        # Buffers, not parameters: diffusers and transformers report a model's dtype from its first floating
        # parameter, which must stay the compute dtype even when every Linear layer is fp8.
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=COMPUTE_DTYPE, device=device),
                                       requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool = False) -> "Fp8Linear":
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", fast=fast)
        q, scale = quantize_fp8_rowwise(weight.detach())
        layer.weight, layer.weight_scale = q, scale
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.shape[-1] % 16 == 0 and self.out_features % 16 == 0:
            return _fp8_matmul(x, self.weight, self.weight_scale, self.bias)
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"fast={self.fast}"


def _fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ (weight * scale).T in fp8 with float accumulation; x gets one dynamic per-tensor scale."""
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else COMPUTE_DTYPE
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    pad = (-rows) % 16  # _scaled_mm wants every dimension a multiple of 16
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    x_scale = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=out_dtype)[:rows]
    y = y * weight_scale.to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------- nf4 layer (bitsandbytes)

def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise InputError("precision 'nf4' needs the bitsandbytes package, which is not installed (or failed to "
                         f"import: {e}). Install it with 'pip install bitsandbytes>=0.46' into ComfyUI's Python, or "
                         "choose the fp8_e4m3fn precision.") from e
    return bitsandbytes


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, double_quant: bool = True):
    """bitsandbytes Linear4bit (nf4, bf16 compute) from a float weight, quantized on the weight's own device."""
    bnb = require_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=COMPUTE_DTYPE,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight.detach().to(COMPUTE_DTYPE), requires_grad=False, quant_type="nf4",
                              compress_statistics=double_quant, blocksize=NF4_BLOCKSIZE, module=layer)
    layer.weight = param._quantize(weight.device)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
    return keep_portable_4bit_layout(layer)


def keep_portable_4bit_layout(layer):
    """Keep a `Linear4bit` in bitsandbytes' portable layout (the one it saves and runs on CUDA).

    From 0.49, `Linear4bit.forward` on a CPU with AVX512-BF16 repacks the weight in place, on its first forward in
    eval mode, into a CPU-only layout (bitsandbytes/nn/modules.py `Linear4bit.forward` ->
    functional.py `_convert_weight_packed_for_cpu`): the absmax becomes a transposed bf16 matrix and the double
    quantization is dropped. The pack dequantizes 4-bit layers to change precision, counts their bytes and moves
    them with `.to()`, which does not undo the repacking; and the repacking raises "shape '[N, 0]' is invalid" for
    a layer whose in_features is not a multiple of the block size. `support_avx512bf16_for_cpu` is the switch
    bitsandbytes reads; older versions ignore it."""
    layer.support_avx512bf16_for_cpu = False
    return layer


def keep_portable_4bit_layouts(model: torch.nn.Module) -> torch.nn.Module:
    """`keep_portable_4bit_layout` on every 4-bit layer of `model` (a pre-quantized folder, loaded by its library)."""
    for module in model.modules():
        if _is_nf4_layer(module):
            keep_portable_4bit_layout(module)
    return model


def _is_nf4_layer(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module.weight, "quant_state")


def _dequantize_4bit(layer, dtype=COMPUTE_DTYPE) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)


# ---------------------------------------------------------------- applying a precision

def _float_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight as a float tensor (dequantized if needed) and its bias."""
    if isinstance(layer, Fp8Linear):
        return layer.dequantized_weight(torch.float32), layer.bias
    if _is_nf4_layer(layer):
        return _dequantize_4bit(layer, torch.float32), layer.bias
    return layer.weight, layer.bias


def _plain_linear(weight: torch.Tensor, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight.detach().to(COMPUTE_DTYPE), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
    return layer


def is_kept(name: str, keep: tuple[str, ...]) -> bool:
    """True if the module path `name` contains one of `keep` as whole dotted parts."""
    dotted = f".{name}."
    return any(f".{k}." in dotted for k in keep)


def _quantizable(module) -> bool:
    return type(module) is torch.nn.Linear or isinstance(module, Fp8Linear) or _is_nf4_layer(module)


def _convert(layer, target: str, fast: bool, double_quant: bool):
    if target == "bf16":
        if type(layer) is torch.nn.Linear:
            return layer
        return _plain_linear(*_float_weight(layer))
    if target == "fp8":
        if isinstance(layer, Fp8Linear):
            layer.fast = fast
            return layer
        return Fp8Linear.from_weight(*_float_weight(layer), fast=fast)
    if _is_nf4_layer(layer):  # target nf4: a pre-quantized 4-bit layer is kept as it came
        return keep_portable_4bit_layout(layer)
    return nf4_linear(*_float_weight(layer), double_quant=double_quant)


def _apply(model: torch.nn.Module, precision: str, keep: tuple[str, ...], double_quant: bool, kind: str,
           allowed: tuple[str, ...]) -> torch.nn.Module:
    if precision not in allowed:
        raise InputError(f"{kind} precision '{precision}' is not available; choose one of {', '.join(allowed)}.")
    target = {"bf16": "bf16", "fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8", "nf4": "nf4"}[precision]
    if target == "nf4":
        require_bitsandbytes()
    fast = False
    if precision == "fp8_e4m3fn_fast":
        fast = fast_fp8_supported()
        if not fast:
            log.warning("flux2-accel: fp8_e4m3fn_fast needs a CUDA GPU of compute capability 8.9+ (none here); "
                        "using fp8_e4m3fn (fp8 storage, bf16 matmuls) instead.")
    # Converting layer by layer, each original's file pages are given back as soon as its copy exists, so a load
    # that converts peaks near the converted model's size instead of the file's plus the converted model's.
    mapped = MappedCheckpoints.snapshot()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not _quantizable(child):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = _convert(child, "bf16" if is_kept(full, keep) else target, fast, double_quant)
            if new is not child:
                setattr(parent, child_name, new)
                if new.weight is not child.weight:
                    mapped.release(child.weight)
                return_free_heap()
    # Everything that is not a quantized weight (norms, embeddings, biases) computes in bf16.
    for module in model.modules():
        if _quantizable(module) and type(module) is not torch.nn.Linear:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype not in (COMPUTE_DTYPE, FP8_DTYPE):
                setattr(module, name, torch.nn.Parameter(p.detach().to(COMPUTE_DTYPE), requires_grad=False))
                mapped.release(p)
    model.flux2_precision = precision
    return model


def apply_precision(model: torch.nn.Module, precision: str, keep: tuple[str, ...] | None = None,
                    double_quant: bool = True) -> torch.nn.Module:
    """Bring a Flux2Transformer2DModel to `precision` in place (and return it).

    `keep` overrides TRANSFORMER_KEEP_BF16 (Linear layers that stay bf16); `double_quant` applies to nf4.
    """
    return _apply(model, precision, TRANSFORMER_KEEP_BF16 if keep is None else tuple(keep), double_quant,
                  "transformer", TRANSFORMER_PRECISIONS)


def apply_text_encoder_precision(model: torch.nn.Module, precision: str, keep: tuple[str, ...] | None = None,
                                 double_quant: bool = True) -> torch.nn.Module:
    """Bring a Mistral3 / Qwen3 text encoder to `precision` in place: its Linear layers are quantized, the embedding
    table, norms and `TEXT_ENCODER_KEEP_BF16` stay bf16."""
    return _apply(model, precision, TEXT_ENCODER_KEEP_BF16 if keep is None else tuple(keep), double_quant,
                  "text encoder", TEXT_ENCODER_PRECISIONS)


# ---------------------------------------------------------------- measuring

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, quantization statistics included (tied tensors counted once)."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if torch.is_tensor(t):
            total += t.numel() * t.element_size()
    if getattr(state, "nested", False):
        total += _quant_state_bytes(state.state2) + 4  # the nested offset
    return total


def estimated_linear_bytes(out_features: int, in_features: int, bias: bool, target: str,
                           double_quant: bool = True) -> int:
    """Bytes one Linear layer takes at `target` ("bf16", "fp8", "nf4"), by the layouts above (bias stays bf16)."""
    n = out_features * in_features
    b = 2 * out_features if bias else 0
    if target == "bf16":
        return 2 * n + b
    if target == "fp8":
        return n + 4 * out_features + b
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks + code + b
    nested_blocks = math.ceil(blocks / 256)
    return math.ceil(n / 2) + blocks + 4 * nested_blocks + 256 * 4 + 4 + code + b


def estimated_weight_bytes(model: torch.nn.Module, precision: str, keep: tuple[str, ...] | None = None,
                           double_quant: bool = True) -> int:
    """What `weight_bytes` would report after `apply_precision(model, precision, keep)`, computed from shapes alone,
    so a full-size model built on the meta device can be counted without memory."""
    keep = TRANSFORMER_KEEP_BF16 if keep is None else tuple(keep)
    target = {"bf16": "bf16", "fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8", "nf4": "nf4"}[precision]
    total, counted = 0, set()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            total += estimated_linear_bytes(module.out_features, module.in_features, module.bias is not None,
                                            "bf16" if is_kept(name, keep) else target, double_quant)
            counted.update(id(p) for p in module.parameters(recurse=False))
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in counted:
                counted.add(id(t))
                total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def rel_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||, in float64."""
    o, r = output.detach().double(), reference.detach().double()
    return float((o - r).norm() / r.norm().clamp(min=1e-30))


def psnr(image: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference` (IMAGE tensors in 0..1)."""
    mse = float(((image.detach().double() - reference.detach().double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(max_value ** 2 / mse)
