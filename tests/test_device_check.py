"""scripts/device_check.sh, the prepared GPU check, run end to end on the CPU with tiny sizes (`--sizes tiny`): the
same script, preset, rows and code a GPU runs, with one row made to fail through the bench's test hook."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_accel.optim.bench.runner import FAIL_ROWS_ENV
from flux2_accel.optim.bench.device_check import JSON_NAME, LOG_NAME, SECTIONS, TABLE_NAME, section_options
from flux2_accel.optim.bench.rows import ERROR, OK, ROW_NAMES, UNAVAILABLE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
FAILING_ROW = "teacache"


@pytest.fixture(scope="module")
def device_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check") / "out"
    env = dict(os.environ, PYTHON=sys.executable, **{FAIL_ROWS_ENV: FAILING_ROW})
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "nvidia-smi").exists())  # as on a machine without it
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--sizes", "tiny", "--compile-backend", "aot_eager",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=900)
    return out, done, json.loads((out / JSON_NAME).read_text())


def rows_of(doc, section):
    return {r["name"]: r for s in doc["sections"] if s["name"] == section for r in s["rows"]}


def test_every_row_of_every_section_is_present_in_order(device_check):
    _, done, doc = device_check
    assert [s["name"] for s in doc["sections"]] == [s.name for s in SECTIONS]
    for section in SECTIONS:
        entry = next(s for s in doc["sections"] if s["name"] == section.name)
        assert entry["error"] is None, entry["error"]
        assert [r["name"] for r in entry["rows"]] == list(section.rows)
        assert entry["options"]["interleave"] is False and entry["options"]["repeats"] == 1
        assert entry["options"]["warmup_steps"] == 2 and entry["options"]["cold_process_compile"] is False
    assert set(rows_of(doc, "dev")) <= set(ROW_NAMES)
    assert doc["preset"] == "device-check" and doc["sizes"] == "tiny"


def test_the_injected_failure_is_recorded_and_the_next_rows_still_run(device_check):
    _, done, doc = device_check
    dev = rows_of(doc, "dev")
    assert dev[FAILING_ROW]["status"] == ERROR
    assert FAIL_ROWS_ENV in dev[FAILING_ROW]["reason"] and dev[FAILING_ROW]["sec_per_step"] is None
    after = list(dev)[list(dev).index(FAILING_ROW) + 1:]
    assert after and all(dev[name]["status"] in (OK, UNAVAILABLE) for name in after)
    klein = rows_of(doc, "klein-4b")
    assert all(r["status"] == OK for name, r in klein.items() if name not in ("cp2", "cp4"))
    # The multi-device rows run where the machine has the devices (here CPU cores), else say why not.
    assert all(klein[name]["status"] == OK or "ranks need" in klein[name]["reason"] for name in ("cp2", "cp4"))
    assert done.returncode == 1  # a failed row makes the check's exit status 1, after everything ran


def test_rows_report_time_deviation_and_steps(device_check):
    _, _, doc = device_check
    for section in SECTIONS:
        rows = rows_of(doc, section.name)
        steps = rows["baseline"]["steps"]
        assert steps == (8 if section.name == "dev" else 4)
        for name, r in rows.items():
            if r["status"] != OK:
                continue
            assert r["sec_per_step"] > 0 and math.isclose(r["sec_per_step"] * steps, r["sec_per_image"]), name
            assert r["rel_l2"] is not None and r["peak_vram_bytes"] is None, name  # no CUDA: no VRAM figure
            if r["computed_steps"] is not None:
                assert r["computed_steps"] + r["skipped_steps"] == steps, name
        assert rows["pack-bf16"]["max_abs_diff"] == 0  # the pack's path is bare diffusers, bit for bit
    dev = rows_of(doc, "dev")
    assert dev["compile"]["recompiles"] == 0 and dev["compile"]["compile_s_cold"] > 0
    assert dev["compile"]["compile_s_warm"] is None  # no second process in the device check


def test_fbcache_half_skips_about_half_and_all_on_composes(device_check):
    _, _, doc = device_check
    dev = rows_of(doc, "dev")
    half, all_on = dev["fbcache-half"], dev["all-on"]
    steps = half["steps"]
    assert abs(half["skipped_steps"] - steps / 2) <= max(1, steps / 8)
    assert (all_on["computed_steps"], all_on["skipped_steps"]) == (half["computed_steps"], half["skipped_steps"])
    assert all_on["recompiles"] == 0
    assert all_on["stats"]["settings"]["cache_threshold"] == half["stats"]["settings"]["threshold"]
    assert all_on["stats"]["settings"]["precision"] == "fp8_e4m3fn"  # no fp8 matmuls on a CPU
    machine = next(s for s in doc["sections"] if s["name"] == "dev")["machine"]
    assert machine["fbcache_half_threshold"] == half["stats"]["settings"]["threshold"]


def test_gpu_only_rows_say_why_they_did_not_run_here(device_check):
    dev = rows_of(device_check[2], "dev")
    for name in ("attn-cudnn", "attn-flash", "attn-sage"):
        assert dev[name]["status"] == UNAVAILABLE and "CUDA GPU" in dev[name]["reason"], name
    assert dev["nf4-offload"]["status"] == OK and "model_cpu" in dev["nf4-offload"]["note"]


def test_files_table_and_log(device_check):
    out, done, doc = device_check
    for name in (JSON_NAME, TABLE_NAME, LOG_NAME, "console.log", "dev.png", "klein-4b.png"):
        assert (out / name).is_file(), name
    assert (out / "dev.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "nvidia-smi.txt").exists()
    assert "no nvidia-smi" in (out / LOG_NAME).read_text()
    table = (out / TABLE_NAME).read_text()
    assert table in done.stdout.replace("\r", "") or table.strip() in done.stdout  # printed at the end
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(lines) == sum(len(s.rows) for s in SECTIONS)
    failing = next(line for line in lines if line.startswith(f"| `{FAILING_ROW}`"))
    assert "| error |" in failing and "injected failure" in failing
    assert "exit status 1" in (out / "console.log").read_text()


def test_real_sizes_are_the_published_ones_at_1024():
    dev, klein = (section_options(s, "real", "cpu", "inductor", None) for s in SECTIONS)
    assert (dev.config, dev.height, dev.width, dev.steps, dev.tokens) == ("dev", 1024, 1024, 28, 512)
    assert (klein.config, klein.height, klein.steps) == ("klein-4b", 1024, 4)
    assert set(klein.rows) == {"baseline", "pack-bf16", "compile", "cp2", "cp4"}
    assert {"baseline", "pack-bf16", "fp8-fast", "nf4-offload", "fbcache-half", "teacache", "compile",
            "all-on"} <= set(dev.rows)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_refuses_a_missing_outdir():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr and "OUTDIR" in done.stderr
