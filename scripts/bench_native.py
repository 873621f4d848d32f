"""Side-by-side bench of the pack's speedups on ComfyUI's own FLUX.2 MODEL, in one process.

    PYTHONPATH=<dir holding flux2_accel> python scripts/bench_native.py COMFYUI_DIR [--size 256] [--steps 8]

Run it with ComfyUI's Python. It builds ComfyUI's FLUX.2 model from its classes with the bench's `small`
proportions (2 double + 18 single blocks, random seeded weights; tests/comfyui_test_nodes), samples through ComfyUI's
own sampler (comfy.sample.sample, euler, one image) and compares, against native plain:
  native plain | + pack cache threshold 0 | + pack cache on, never skipping | + pack cache skipping k of n |
  + ComfyUI EasyCache skipping (as near as its threshold allows) the same k | + pack compile | + compile and cache
Time per image (median of --repeats rounds after one warm-up run each; each round runs every configuration once in
turn), its ratio to native plain (median over rounds of the ratio within a round, so the machine's slow spells
cancel out) and deviation (rel L2 of the latent vs native plain),
then the recompile check: compile + cache with a native LoRA through strength changes, removal, LoRA after the
compile node, new seed, new step count and new cache threshold, counting dynamo graphs after the first run.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_comfyui(comfyui_dir: str):
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "comfyui_test_nodes"))
    import comfyui_launcher

    if comfyui_launcher.install_stand_in():
        import torchvision.transforms  # noqa: F401  (ComfyUI imports it by attribute; the stand-in needs it first)
    os.chdir(comfyui_dir)
    sys.path.insert(0, comfyui_dir)
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    comfy.cli_args.args.use_pytorch_cross_attention = True  # ComfyUI's CPU default queries memory inside blocks


def time_in_rounds(runs, repeats: int, device):
    """One warm-up call of each run (compiles), then `repeats` rounds that call every run once in turn, timed with
    the bench's Stopwatch (device work included). Returns (each run's last output, each run's seconds per round)."""
    from flux2_accel.optim.bench.measure import Stopwatch

    outputs = [run() for run in runs]
    times = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            with Stopwatch(device) as watch:
                outputs[i] = run()
            times[i].append(watch.seconds)
    return outputs, times


class SkipCounter(logging.Handler):
    """EasyCache logs 'EasyCache - skipped K/N steps'."""

    def __init__(self):
        super().__init__()
        self.last = None

    def emit(self, record):
        match = re.search(r"EasyCache - skipped (\d+)/(\d+) steps", record.getMessage())
        if match:
            self.last = int(match.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("comfyui_dir")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size / 16)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="prompt tokens (ComfyUI pads FLUX.2 text to 512)")
    p.add_argument("--compile-backend", default="inductor")
    args = p.parse_args(argv)
    setup_comfyui(args.comfyui_dir)

    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import torch
    from comfy_extras.nodes_easycache import EasyCacheNode
    from flux2_accel.nodes import native_cache, native_compile
    from flux2_accel.optim.features.caching import CacheSettings
    from flux2_accel.optim.features.compile import CompileSettings, graph_count
    from flux2_accel.optim.models.precision import rel_l2
    from flux2_accel_native_test_nodes import CONFIGS, build_flux2_model

    logging.basicConfig(level=logging.WARNING)
    counter = SkipCounter()
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("root",):
        logging.getLogger(noisy).propagate = True
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode():  # as ComfyUI builds models: inside its executor's inference mode
        base = build_flux2_model(CONFIGS["small"], seed=0)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, args.tokens, 192, generator=g), {"guidance": 4.0, "pooled_output": None}]]
    latent = torch.zeros(1, 128, args.size // 16, args.size // 16)
    n = args.steps

    def sample(model, seed=1, steps=n):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                                       seed=seed, disable_pbar=True)

    def timed_side_by_side(models):
        """Per model: (latent, median seconds per image, median over rounds of its time over the first model's
        in the same round, so a slow spell of the machine cancels out)."""
        outputs, times = time_in_rounds([lambda model=model: sample(model) for model in models], args.repeats,
                                        device)
        return [(out, statistics.median(t), statistics.median(a / b for a, b in zip(t, times[0])))
                for out, t in zip(outputs, times)]

    def skipped_by(model_with_cache):
        seen = []
        handler = logging.Handler()
        handler.emit = lambda r: seen.append(r.getMessage())
        logging.getLogger("flux2_accel").addHandler(handler)
        try:
            sample(model_with_cache)
        finally:
            logging.getLogger("flux2_accel").removeHandler(handler)
        match = [re.search(r"skipped (\d+) of", s) for s in seen]
        return next(int(m.group(1)) for m in reversed(match) if m)

    def easycache(threshold):
        return EasyCacheNode.execute(base, threshold, 0.0, 1.0, False).result[0]

    def easycache_skips(threshold):
        counter.last = None
        sample(easycache(threshold))
        return counter.last

    configurations = [("native plain", 0, base)]
    configurations.append(("+ pack cache, threshold 0", 0, native_cache.patched(base, CacheSettings("fbcache", 0.0))))
    never = native_cache.patched(base, CacheSettings("fbcache", 1e-9))
    configurations.append(("+ pack cache on, never skipping", skipped_by(never), never))
    # Random weights change more per step than a trained model: a high threshold lets the limits decide (every
    # other step after the first), so the skip count is known.
    skipping_settings = CacheSettings("fbcache", 5.0, max_consecutive_cached=1, warmup_steps=1)
    skipping = native_cache.patched(base, skipping_settings)
    k = skipped_by(skipping)
    configurations.append((f"+ pack cache fbcache (threshold {skipping_settings.threshold}, max 1 in a row)", k,
                           skipping))
    lo, hi, best = 0.0, 3.0, None
    for _ in range(8):  # bisect EasyCache's threshold to the same skip count
        mid = (lo + hi) / 2
        got = easycache_skips(mid)
        if best is None or abs(got - k) < abs(best[1] - k):
            best = (mid, got)
        if got == k:
            break
        lo, hi = (mid, hi) if got < k else (lo, mid)
    configurations.append((f"+ ComfyUI EasyCache (reuse_threshold {best[0]:.3f})", best[1], easycache(best[0])))
    teacache_settings = CacheSettings("teacache", 1000.0, max_consecutive_cached=1, warmup_steps=1)
    teacache_skipping = native_cache.patched(base, teacache_settings)
    configurations.append((f"+ pack cache teacache (threshold {teacache_settings.threshold}, max 1 in a row)",
                           skipped_by(teacache_skipping), teacache_skipping))
    compile_settings = CompileSettings("regional", backend=args.compile_backend)
    compiled = native_compile.patched(base, compile_settings)
    configurations.append((f"+ pack compile ({args.compile_backend}, regional)", 0, compiled))
    configurations.append(("+ pack compile + cache skipping", k, native_cache.patched(compiled, skipping_settings)))
    results = timed_side_by_side([model for _, _, model in configurations])
    rows = [(name, skipped, seconds, ratio, out)
            for (name, skipped, _), (out, seconds, ratio) in zip(configurations, results)]
    plain = results[0][0]

    # recompile check: LoRA strength / removal / placement, seed, steps, threshold
    lora = {}
    gl = torch.Generator().manual_seed(5)
    for name, module in base.model.diffusion_model.named_modules():
        if "blocks." in name and isinstance(module, torch.nn.Linear):
            key = "diffusion_model." + name
            lora[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=gl) * 0.05
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=gl) * 0.05
            lora[f"{key}.alpha"] = torch.tensor(4.0)

    def with_lora(model, strength):
        with torch.inference_mode():
            return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]

    cache_compiled = native_cache.patched(compiled, CacheSettings("fbcache", 0.1))
    sequence = [("LoRA 0.5 (first)", lambda: sample(with_lora(cache_compiled, 0.5))),
                ("LoRA 1.0", lambda: sample(with_lora(cache_compiled, 1.0))),
                ("LoRA removed", lambda: sample(cache_compiled)),
                ("LoRA after compile node", lambda: sample(native_cache.patched(
                    with_lora(compiled, 0.8), CacheSettings("fbcache", 0.1)))),
                ("new seed", lambda: sample(with_lora(cache_compiled, 0.8), seed=9)),
                ("new steps", lambda: sample(with_lora(cache_compiled, 0.8), steps=n - 2)),
                ("new threshold", lambda: sample(native_cache.patched(with_lora(compiled, 0.8),
                                                                      CacheSettings("fbcache", 0.3))))]
    graphs = []
    for name, run in sequence:
        before = graph_count()
        run()
        graphs.append((name, graph_count() - before))

    print(f"\nComfyUI FLUX.2 `small` (2 double + 18 single blocks, hidden 256), {args.size}x{args.size}, {n} steps, "
          f"euler, cfg 1, device {device}, torch {torch.__version__}\n")
    print("| configuration | skipped steps | s / image | vs plain (paired) | rel L2 vs plain | bit-identical |")
    print("|---|---|---|---|---|---|")
    for name, skipped, seconds, ratio, out in rows:
        print(f"| {name} | {skipped}/{n} | {seconds:.3f} | {ratio:.3f} | {rel_l2(out, plain):.4f} | "
              f"{torch.equal(out, plain)} |")
    print(f"\nTarget for skipping k of n: <= 1.1 x (n-k)/n of plain = {1.1 * (n - k) / n:.3f} (k={k})")
    print("\nRecompiles (dynamo graphs compiled per run, compile + cache + native LoRA):\n")
    print("| run | new graphs |")
    print("|---|---|")
    for name, count in graphs:
        print(f"| {name} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
