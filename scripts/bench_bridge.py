"""Per-step cost of the MODEL bridge: the pack's model under ComfyUI's sampler against the pack's own sampler.

    PYTHONPATH=<dir holding flux2_accel> python scripts/bench_bridge.py COMFYUI_DIR [--size 256] [--steps 8]

Run it with ComfyUI's Python. It writes the bench's `small` FLUX.2 [dev] transformer (random seeded weights) and
the tiny VAE to a temporary folder, loads them through the pack's handles (precision --precision), and samples the
same seed, size and steps two ways, in one process:
  pack sampler   engine.run (the pack's Sampler node without the decode): diffusers' Flux2Pipeline, euler,
                 FLUX.2's shipped schedule;
  bridge         Model to ComfyUI's MODEL (nodes/native_model.native_patcher) under ComfyUI's own sampling:
                 CFGGuider at cfg 1 with FluxGuidance's value, euler, Flux2Scheduler's sigmas (the same schedule).
Time per image (each round runs both once, --repeats rounds after a warm-up each), the bridge's cost per step as
the median over rounds of bridge / pack - 1, and the latents' rel L2. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_native import setup_comfyui, time_in_rounds  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("comfyui_dir")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=512,
                   help="prompt tokens (FLUX.2 text encoders give 512; ComfyUI pads shorter ones to 512 in front)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8_e4m3fn", "nf4"))
    args = p.parse_args(argv)
    setup_comfyui(args.comfyui_dir)

    import comfy.model_management
    import comfy.samplers
    import torch
    from comfy_extras.nodes_flux import Flux2Scheduler
    from flux2_accel.nodes import native_model
    from flux2_accel.optim.handle import ModelHandle, VaeHandle
    from flux2_accel.optim.models import tiny
    from flux2_accel.optim.models.precision import rel_l2
    from flux2_accel.optim.models.text_encoding import Flux2Conditioning
    from flux2_accel.optim.run import engine
    from flux2_accel.optim.run.sampling import SamplingParams
    from flux2_accel.optim.run.store import STORE
    from safetensors.torch import save_file

    device = comfy.model_management.get_torch_device()
    comps = tiny.build_components(tiny.SMALL, seed=0)
    folder = Path(tempfile.mkdtemp(prefix="flux2_bridge_bench_"))
    save_file({k: v.contiguous() for k, v in comps.transformer.state_dict().items()},
              str(folder / "small_transformer.safetensors"))
    save_file({k: v.contiguous() for k, v in comps.vae.state_dict().items()}, str(folder / "vae.safetensors"))
    handle = ModelHandle(source=str(folder / "small_transformer.safetensors"), precision=args.precision)
    vae = VaeHandle(source=str(folder / "vae.safetensors"), dtype="fp32")
    width = comps.transformer.config.joint_attention_dim
    embeds = torch.randn(1, args.tokens, width, generator=torch.Generator().manual_seed(0))
    embeds = embeds.to(torch.bfloat16)  # what the pack's text encoders give
    cond = Flux2Conditioning(prompt_embeds=embeds, family="mistral")
    params = SamplingParams(width=args.size, height=args.size, steps=args.steps, guidance=4.0, seed=3)

    def pack_sampler():
        return engine.run(handle, vae, cond, params, decode=False, device=device).latent

    patcher = native_model.native_patcher(handle)
    positive = [[embeds, {"guidance": params.guidance, "pooled_output": None}]]
    channels = comps.transformer.config.in_channels
    empty = torch.zeros(1, channels, args.size // 16, args.size // 16)
    sigmas = Flux2Scheduler.execute(args.steps, args.size, args.size).result[0]
    sampler = comfy.samplers.sampler_object("euler")

    def bridge():
        noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(params.seed))
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        with torch.inference_mode():
            out = guider.sample(noise, empty, sampler, sigmas, seed=params.seed, disable_pbar=True)
        return patcher.model.process_latent_out(out.float()).cpu()

    paths = [("pack sampler (engine.run, no decode)", pack_sampler), ("bridge: Model to ComfyUI + ComfyUI euler",
                                                                      bridge)]
    outputs, times = time_in_rounds([run for _, run in paths], args.repeats, device)
    per_round = [b / a - 1 for a, b in zip(*times)]
    pack_latent, bridge_latent = outputs
    print(f"\nbench `small` FLUX.2 [dev] ({args.precision}), {args.size}x{args.size}, {args.steps} steps, euler, "
          f"device {device}, torch {torch.__version__}, {args.repeats} rounds\n")
    print("| path | s / image | s / step |")
    print("|---|---|---|")
    for (name, _), t in zip(paths, times):
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / args.steps:.4f} |")
    print(f"\nBridge cost per step: median over rounds {100 * statistics.median(per_round):+.1f}% (rounds from "
          f"{100 * min(per_round):+.1f}% to {100 * max(per_round):+.1f}%); target <= +2%")
    print(f"Latent rel L2, bridge vs pack sampler: {rel_l2(bridge_latent, pack_latent):.2e} (target <= 1e-3)")
    STORE.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
