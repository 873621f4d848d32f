"""The prepared GPU check: `flux2-accel bench --preset device-check --out DIR` (scripts/device_check.sh wraps it).

Two bench runs in one process, one after the other, on random bf16 weights built on the GPU:
- FLUX.2 [dev] (32B) at 1024x1024, 28 steps, 512-token embeddings [1, 512, 15360]: baseline (bare diffusers),
  pack-bf16, fp8-fast, fbcache-half, all-on (fp8-fast + regional compile + First Block Cache), compile, nf4-offload
  (nf4 with model_cpu offload: peak VRAM is the figure), teacache, and one row per attention backend;
- FLUX.2 [klein] 4B at 1024x1024, 4 steps: baseline, pack-bf16, compile.
Every row: one warm-up run of WARMUP_STEPS steps (same shapes: kernels, cuBLAS and compiled code all warm), one
timed run; rows one at a time, memory released between them; a row that fails (out of memory, say) is recorded with
its reason and the next one runs. `--sizes tiny` runs the same rows and code on tiny models, 64x64, 8 [dev] steps
(tests, CPU: seconds).

Time budget on one H200 (estimates: no GPU figure exists yet):
  start, imports, CUDA init                                                        ~20 s
  [dev] per row: build 64 GB of random bf16 weights on the GPU                      ~8 s
  [dev] one 28-step image, bf16: 2.83e14 FLOP/step (2.53e14 in the linear layers, 0.29e14 in attention over 4608
        tokens) at ~50% of 990 TFLOP/s = 0.57 s/step                               ~16 s (+1.2 s 2-step warm-up)
  [dev] rows: baseline 25, pack-bf16 25, fp8-fast 22, fbcache-half 17, all-on 70 (compile ~60),
        compile 65 (compile ~45), nf4-offload 40 (4 GB/s-ish host<->GPU copies of ~18 GB), teacache 25,
        attn-cudnn 25, attn-flash and attn-sage 0 when not installed (25 each when they are)  ~315 s
  [klein] 4B: 3.5e13 FLOP/step = 0.07 s/step at 50%: baseline 10, pack-bf16 10, compile 45  ~65 s
  total                                                                             ~400 s, under 7 minutes
Guard rails, so the check ends under 8 minutes whatever the estimates miss: a [dev] row starts only within
DEV_START_BUDGET_S of the start, a [klein] row within KLEIN_START_BUDGET_S (later rows are reported "not run: the
time budget..."); the longest row (all-on, ~70 s) started at the last moment still ends by ~7.5 minutes. The script
adds a hard `timeout`; the JSON is rewritten after every row, so a cut run still leaves its rows.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .runner import BenchOptions, run_bench
from .report import SCHEMA_VERSION, format_markdown, plot, write_json
from .rows import ERROR, release

log = logging.getLogger("flux2_accel")

WARMUP_STEPS = 2
DEV_START_BUDGET_S = 300.0
KLEIN_START_BUDGET_S = 400.0
JSON_NAME, TABLE_NAME, LOG_NAME = "device_check.json", "device_check.md", "device_check.log"


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    config: str  # bench config at real sizes
    tiny_config: str  # the same family, tiny (--sizes tiny)
    steps: int
    tiny_steps: int  # fewer for --sizes tiny where a step count changes nothing but the time the test takes
    rows: tuple[str, ...]
    start_budget_s: float


SECTIONS = (
    Section("dev", "FLUX.2 [dev]", "dev", "tiny", 28, 8,
            ("baseline", "pack-bf16", "fp8-fast", "fbcache-half", "all-on", "compile", "nf4-offload", "teacache",
             "attn-cudnn", "attn-flash", "attn-sage"), DEV_START_BUDGET_S),
    Section("klein-4b", "FLUX.2 [klein] 4B", "klein-4b", "tiny-klein", 4, 4,
            ("baseline", "pack-bf16", "compile", "cp2", "cp4"),
            KLEIN_START_BUDGET_S),
)
REAL_SIZE, TINY_SIZE = 1024, 64
REAL_TOKENS, TINY_TOKENS = 512, 8


def section_options(section: Section, sizes: str, device: str, compile_backend: str,
                    deadline_s: float | None) -> BenchOptions:
    tiny = sizes == "tiny"
    size = TINY_SIZE if tiny else REAL_SIZE
    return BenchOptions(config=section.tiny_config if tiny else section.config, height=size, width=size,
                        steps=section.tiny_steps if tiny else section.steps, repeats=1, warmup=1,
                        warmup_steps=WARMUP_STEPS, device=device,
                        rows=section.rows, text_tokens=TINY_TOKENS if tiny else REAL_TOKENS, interleave=False,
                        attention_backend="sdpa", compile_backend=compile_backend, cold_process_compile=False,
                        deadline_s=deadline_s)


def run_device_check(out: str | Path, sizes: str = "real", device: str | None = None,
                     compile_backend: str = "inductor") -> int:
    """Run every section into `out` (JSON, markdown table, one chart per section, log). Prints the table.
    Exit status 0 when every row ran or was unavailable, 1 when a row or a section failed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.monotonic()
    handler = logging.FileHandler(out / LOG_NAME, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)  # failed rows' tracebacks are logged at debug level
    previous_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        log.info(text)

    doc = {"schema_version": SCHEMA_VERSION, "preset": "device-check", "sizes": sizes, "machine": {},
           "sections": []}

    def save(partial: dict | None = None) -> None:
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(out / JSON_NAME, {**doc, "sections": doc["sections"] + ([partial] if partial else [])})

    tables = []
    try:
        if nvidia_smi(out) is None:
            say("device check: no nvidia-smi on this machine; nvidia-smi.txt skipped")
        for section in SECTIONS:
            left = section.start_budget_s - (time.monotonic() - started)
            options = section_options(section, sizes, device, compile_backend, max(0.0, left))
            entry = {"name": section.name, "title": section.title, "options": _options_json(options), "rows": [],
                     "error": None}
            say(f"device check: {section.title}, {options.config} {options.width}x{options.height}, "
                f"{options.steps} steps, rows {', '.join(options.rows)}")
            rows = []
            try:
                rows, machine = run_bench(options, progress=say, on_row=lambda results, entry=entry: save(
                    {**entry, "rows": [r.to_json() for r in results.values()]}))
                doc["machine"] = entry["machine"] = machine
            except Exception as e:  # the section's baseline failed: the next section still runs
                entry["error"] = f"{type(e).__name__}: {e}"
                say(f"device check: {section.title} failed: {entry['error']}")
                log.debug("%s", traceback.format_exc())
            entry["rows"] = [r.to_json() for r in rows]
            doc["sections"].append(entry)
            save()
            release()
            heading = f"{section.title}, {options.width}x{options.height}, {options.steps} steps"
            if rows:
                _plot(out / f"{section.name}.png", rows, heading, say)
                tables.append(f"### {heading}\n\n{format_markdown(rows)}")
            else:
                tables.append(f"### {heading}\n\nnot run: {entry['error']}")
        machine = doc["machine"]
        where = machine.get("gpu") or machine.get("cpu", "?")
        text = (f"flux2-accel device check on {where} ({sizes} sizes), torch {machine.get('torch')}, diffusers "
                f"{machine.get('diffusers')}, {doc['elapsed_s']:.0f} s\n\n" + "\n\n".join(tables) + "\n")
        (out / TABLE_NAME).write_text(text)
        print(text)
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
        handler.close()
    failed = any(s["error"] for s in doc["sections"]) or any(r["status"] == ERROR for s in doc["sections"]
                                                              for r in s["rows"])
    return 1 if failed else 0


def _plot(path: Path, rows, title: str, say) -> None:
    try:
        plot(path, rows, title)
    except Exception as e:  # a chart is not worth losing the figures over (no matplotlib, say)
        say(f"device check: no chart {path.name}: {type(e).__name__}: {e}")


def _options_json(options: BenchOptions) -> dict:
    d = dataclasses.asdict(options)
    d["rows"] = list(options.rows)
    d["text_tokens"] = options.tokens
    return d


def nvidia_smi(out: Path) -> str | None:
    """`nvidia-smi`'s report into out/nvidia-smi.txt; None (and no file) where there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        (out / "nvidia-smi.txt").write_text(f"nvidia-smi failed: {e}\n")
        return None
    (out / "nvidia-smi.txt").write_text(done.stdout + done.stderr)
    return done.stdout

