"""`flux2-accel bench`: a tiny run checks the schema and that the values make sense (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from flux2_accel.optim.bench.measure import CLEAR, REFERENCE, TOO_FEW_ROUNDS, WITHIN_NOISE, speedup
from flux2_accel.optim.bench.models import CONFIGS
from flux2_accel.optim.bench.report import document, format_markdown, format_table, write_json
from flux2_accel.optim.bench.rows import DEFAULT_ROWS, OK, ROW_NAMES, RowResult
from flux2_accel.optim.bench.runner import BenchOptions, run_bench
from flux2_accel.optim.cli import main as cli
from flux2_accel.optim.errors import InputError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmark.md"
STEPS = 3
# Compile is left out of the suite's run: its cold compile alone takes tens of seconds on a CPU. all-on compiles
# too, with aot_eager (no code generation).
TINY_ROWS = tuple(r for r in DEFAULT_ROWS if r != "compile")
ALL_ON_STEPS = 8  # enough steps for fbcache-half to skip about half


def tiny_options(temp_dir, **changes) -> BenchOptions:
    base = dict(config="tiny", height=64, width=64, steps=STEPS, repeats=1, warmup=0, device="cpu", rows=TINY_ROWS,
                text_tokens=8, compile_backend="aot_eager", temp_dir=str(temp_dir))
    return BenchOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_bench(tiny_options(tmp_path_factory.mktemp("bench")))


def by_name(rows) -> dict[str, RowResult]:
    return {r.name: r for r in rows}


def test_every_requested_row_is_reported_in_order_baseline_first(tiny_run):
    rows, machine = tiny_run
    assert [r.name for r in rows] == list(TINY_ROWS)
    assert machine["torch"] == torch.__version__ and machine["cpu_count"] >= 1
    for r in rows:  # every row but compile runs on a CPU: none may be unavailable or failed
        assert r.status == OK, f"{r.name} is {r.status}: {r.reason}"
        assert r.reason is None
        assert (r.config, r.device, r.steps) == ("tiny", "cpu", STEPS)


def test_values_are_sane(tiny_run):
    rows, _ = tiny_run
    ran = [r for r in rows if r.status == OK]
    assert [r.name for r in ran] == list(TINY_ROWS)
    for r in ran:
        assert len(r.run_seconds) == 1 and all(s > 0 for s in r.run_seconds), r.name
        assert r.sec_per_step > 0 and r.sec_per_image > 0 and r.speedup_vs_baseline > 0, r.name
        assert math.isclose(r.sec_per_step * STEPS, r.sec_per_image), r.name
        assert r.weight_bytes > 0 and r.peak_mem_bytes is not None and r.peak_mem_bytes >= 0, r.name
        assert r.max_abs_diff >= 0 and r.rel_l2 >= 0 and r.psnr is not None, r.name
        if r.computed_steps is not None:
            assert r.computed_steps >= 1 and r.skipped_steps >= 0, r.name
            assert r.computed_steps + r.skipped_steps == STEPS, r.name
    row = by_name(rows)
    assert row["baseline"].speedup_vs_baseline == 1.0
    assert row["baseline"].max_abs_diff == 0 and math.isinf(row["baseline"].psnr)
    assert (row["baseline"].computed_steps, row["baseline"].skipped_steps) == (STEPS, 0)


def test_pack_path_is_bit_identical_to_bare_diffusers(tiny_run):
    row = by_name(tiny_run[0])
    assert row["pack-bf16"].max_abs_diff == 0 and row["pack-bf16"].rel_l2 == 0 and math.isinf(row["pack-bf16"].psnr)
    assert row["pack-bf16"].weight_bytes == row["baseline"].weight_bytes
    assert row["fbcache-0"].max_abs_diff == 0  # threshold 0 must never change a step
    assert (row["fbcache-0"].computed_steps, row["fbcache-0"].skipped_steps) == (STEPS, 0)


def test_quantized_rows_store_fewer_bytes_and_deviate_a_little(tiny_run):
    row = by_name(tiny_run[0])
    bf16 = row["pack-bf16"].weight_bytes
    for name in ("fp8", "fp8-fast", "nf4"):
        assert row[name].weight_bytes < bf16, name
        assert 0 < row[name].rel_l2 < 0.2, name
    assert row["nf4"].weight_bytes < row["fp8"].weight_bytes


def test_cache_rows_report_the_features_own_counts(tiny_run):
    row = by_name(tiny_run[0])
    for name in ("fbcache", "fbcache-noskip", "fbcache-skip", "fbcache-half", "teacache"):
        stats = row[name].stats["cache"]
        assert stats["method"] == name.split("-")[0]
        assert (row[name].computed_steps, row[name].skipped_steps) == (stats["computed_steps"],
                                                                       stats["skipped_steps"])
        assert row[name].note is None, row[name].note  # the cache's counts agree with the last block's
        if row[name].skipped_steps == 0:
            assert row[name].max_abs_diff == 0, name  # nothing skipped: nothing may change


def test_lora_row_reruns_at_a_new_strength_without_reloading(tiny_run):
    r = by_name(tiny_run[0])["lora-restrength"]
    assert r.status == OK, r.reason
    assert r.stats["lora"]["active"] == ["bench_lora.safetensors x0.5"]  # loaded at 1.0, timed after the change
    assert r.stats["first_run_with_lora_load_s"] > 0 and r.stats["plain_rerun_s"] > 0
    assert r.stats["restrength_over_plain"] == pytest.approx(r.run_seconds[0] / r.stats["plain_rerun_s"], rel=1e-3)
    assert (r.computed_steps, r.skipped_steps) == (STEPS, 0)  # the plain re-run's steps are not counted
    assert r.max_abs_diff > 0 and r.psnr < math.inf  # the LoRA changes the image
    assert r.weight_bytes > by_name(tiny_run[0])["pack-bf16"].weight_bytes  # its adapter weights are counted


def test_json_document_matches_the_documented_schema(tiny_run, tmp_path):
    rows, machine = tiny_run
    path = tmp_path / "bench.json"
    write_json(path, document(rows, machine, {"config": "tiny"}))
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["options"] == {"config": "tiny"}
    documented = set(re.findall(r"^\| `(\w+)` \|", DOCS.read_text(), flags=re.M))
    for r in doc["rows"]:
        assert set(r) <= documented, f"undocumented fields: {set(r) - documented}"
        assert set(r) == set(doc["rows"][0])
    baseline = doc["rows"][0]
    assert baseline["psnr"] == "inf" and baseline["status"] == "ok"
    assert {"name", "status", "config", "device", "steps", "sec_per_step", "sec_per_image", "speedup_vs_baseline",
            "peak_mem_bytes", "weight_bytes", "computed_steps", "skipped_steps", "compile_s_cold",
            "compile_s_warm", "recompiles", "max_abs_diff", "rel_l2", "psnr"} <= set(baseline)
    table = format_table(rows)
    warning, header = table.splitlines()[:2]  # one timed round: the warning comes first
    assert warning.startswith("warning: 1 timed round per row") and doc["warnings"] == [warning]
    assert header.split()[:3] == ["row", "status", "s/step"]
    assert all(r["speedup_verdict"] == "too few rounds" for r in doc["rows"][1:])
    assert all(any(line.startswith(r.name + " ") for line in table.splitlines()) for r in rows)


def test_cli_runs_rows_one_after_another_and_writes_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bench's work folder, under tmp_path
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = cli.main(["bench", "--config", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--repeats",
                     "1", "--warmup", "0", "--text-tokens", "8", "--rows", "fbcache-skip,pack-bf16", "--interleave",
                     "off", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert [r["name"] for r in doc["rows"]] == ["baseline", "fbcache-skip", "pack-bf16"]
    assert all(r["status"] == "ok" and r["reason"] is None for r in doc["rows"])
    assert doc["rows"][2]["max_abs_diff"] == 0  # one row after another, as for the real sizes
    assert doc["options"]["interleave"] is False
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["fbcache-skip", "ok"] for line in printed.splitlines())


def test_bad_options_are_refused_with_the_valid_choices(tmp_path):
    with pytest.raises(InputError, match="unknown rows fp16.*baseline"):
        run_bench(tiny_options(tmp_path, rows=("fp16",)))
    with pytest.raises(InputError, match="--steps is 0"):
        run_bench(tiny_options(tmp_path, steps=0))


@pytest.mark.parametrize("name, params, joint", [("klein-4b", 3.9e9, 7680), ("klein-9b", 9.1e9, 12288),
                                                 ("dev", 32.2e9, 15360)])
def test_real_size_configs_have_the_published_shapes(name, params, joint):
    from diffusers import Flux2Transformer2DModel

    spec = CONFIGS[name]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**spec.transformer_config())
    assert model.config.joint_attention_dim == joint and model.config.in_channels == 128
    assert model.config.guidance_embeds == (name == "dev")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.03)


def test_fbcache_rows_pin_the_cache_on_without_and_with_skipping(tiny_run):
    row = by_name(tiny_run[0])
    noskip, skip = row["fbcache-noskip"], row["fbcache-skip"]
    assert "cache" in noskip.stats and noskip.skipped_steps == 0 and noskip.max_abs_diff == 0  # on, exact
    assert skip.skipped_steps >= 1 and skip.max_abs_diff > 0  # random weights do skip at this threshold
    assert "cache" not in row["fbcache-0"].stats  # threshold 0 is off: the feature does not install


def test_compile_row_measures_cold_and_warm_compiles_and_no_recompiles(tmp_path):
    rows, _ = run_bench(tiny_options(tmp_path, rows=("compile",), repeats=2))
    r = by_name(rows)["compile"]
    assert r.status == OK, r.reason
    assert r.compile_s_warm < r.compile_s_cold and r.recompiles == 0
    assert r.stats["compile"]["compiled"] and r.stats["compile_cold_process"]["fallback"] is None
    assert r.rel_l2 < 0.02  # inductor's bf16 kernels round differently from eager, nothing more


def test_speedup_pairs_rounds_when_rows_are_interleaved():
    baseline, row = [1.0, 2.0, 1.2], [0.5, 1.0, 0.6]  # the machine slowed down in round 2, for both rows alike
    assert speedup(baseline, row, paired=True).value == 2.0
    assert speedup(baseline, [0.5, 1.0, 0.7], paired=True).value == 2.0  # median of 2.0, 2.0, 1.71
    assert speedup(baseline, [0.5, 1.0, 0.6], paired=False).value == pytest.approx(1.2 / 0.6)
    assert speedup([1.0, 2.0], [0.5, 1.0, 0.6], paired=True).value == pytest.approx(1.5 / 0.6)  # unequal: medians


# ---------------------------------------------------------------- spread and noise, on synthetic timings

def test_the_spread_is_over_the_per_round_ratios_when_paired_and_every_pair_otherwise():
    paired = speedup([1.0, 2.0, 1.2], [0.5, 1.0, 0.8], paired=True)  # ratios 2.0, 2.0, 1.5
    assert (paired.low, paired.high) == pytest.approx((1.5, 2.0)) and (paired.rounds, paired.paired) == (3, True)
    assert paired.verdict == CLEAR  # spread 0.5 < distance 1.0
    unpaired = speedup([1.0, 2.0, 1.2], [0.5, 1.0, 0.8], paired=False)  # every baseline run over every row run
    assert (unpaired.low, unpaired.high) == (pytest.approx(1.0 / 1.0), pytest.approx(2.0 / 0.5))
    assert unpaired.verdict == WITHIN_NOISE and not unpaired.paired  # spread 3.0 > distance 0.5


@pytest.mark.parametrize("baseline, row, verdict", [
    ([1.0, 1.0, 1.0], [1.05, 0.95, 1.0], WITHIN_NOISE),  # the same code: ratios 0.95-1.05 around 1.0
    ([0.1, 0.1, 2.0], [0.1, 0.1, 0.1], WITHIN_NOISE),  # one round under load: median 1.0, spread up to 20x
    ([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.52, 0.48, 2.0], WITHIN_NOISE),  # 2x, but one round at 0.5x
    ([1.0, 1.0, 1.0], [0.5, 0.55, 0.45], CLEAR),  # about 2x, spread 0.4 < distance 1.0
    ([1.0, 1.0, 1.0], [1.5, 1.6, 1.55], CLEAR),  # slower, and clearly so
    ([1.0, 1.2], [0.1, 0.1], TOO_FEW_ROUNDS),  # 2 rounds: the median is the mean, no figure whatever it says
    ([1.0], [0.5], TOO_FEW_ROUNDS),
])
def test_verdicts_on_synthetic_timings(baseline, row, verdict):
    assert speedup(baseline, row, paired=True).verdict == verdict


def test_the_baseline_is_the_reference_and_a_spread_equal_to_the_distance_is_not_noise():
    assert speedup([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], paired=True, reference=True).verdict == REFERENCE
    edge = speedup([1.0, 1.0, 1.0], [0.5, 0.5, 1.0], paired=True)  # ratios 1, 2, 2: spread 1.0, distance 1.0
    assert (edge.value, edge.high - edge.low, edge.verdict) == (2.0, 1.0, CLEAR)


def synthetic_rows(baseline, timings: dict[str, list[float]]) -> list[RowResult]:
    """Rows as the bench fills them, from synthetic per-round times (paired)."""
    rows = []
    for name, seconds in {"baseline": baseline, **timings}.items():
        r = RowResult(name, OK, "tiny", "cpu", 2, run_seconds=seconds)
        s = speedup(baseline, seconds, paired=True, reference=name == "baseline")
        r.speedup_vs_baseline, r.speedup_min, r.speedup_max = s.value, s.low, s.high
        r.speedup_rounds, r.speedup_verdict = s.rounds, s.verdict
        r.sec_per_step, r.rel_l2 = seconds[0], 0.0 if name == "baseline" else 0.01
        rows.append(r)
    return rows


def cells(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(name + " "))


def test_table_json_and_markdown_show_the_spread_and_flag_noise(tmp_path):
    rows = synthetic_rows([1.0, 2.0, 1.0], {"fast": [0.5, 1.0, 0.52], "noisy": [0.1, 2.0, 1.0]})
    table = format_table(rows)
    assert "1.92-2.00" in cells(table, "fast") and "(noise)" not in cells(table, "fast")
    assert "1.00x (noise)" in cells(table, "noisy") and "1.00-10.00" in cells(table, "noisy")
    assert "within noise" in table and "warning" not in table
    path = tmp_path / "b.json"
    write_json(path, document(rows, {}, {}))
    doc = json.loads(path.read_text())
    assert doc["warnings"] == []
    noisy = doc["rows"][2]
    assert (noisy["speedup_verdict"], noisy["speedup_rounds"]) == (WITHIN_NOISE, 3)
    assert (noisy["speedup_min"], noisy["speedup_max"]) == pytest.approx((1.0, 10.0))
    assert doc["rows"][0]["speedup_verdict"] == REFERENCE and doc["rows"][1]["speedup_verdict"] == CLEAR
    assert "1.00x (noise)" in format_markdown(rows) and "within noise" in format_markdown(rows)


def test_fewer_than_three_rounds_warns_and_shows_no_speedup(tmp_path):
    rows = synthetic_rows([0.1053, 0.1053], {"fbcache-noskip": [0.1133, 0.0101]})  # the 5.48x
    table = format_table(rows)
    assert table.splitlines()[0].startswith("warning: 2 timed rounds per row, fewer than 3")
    assert cells(table, "fbcache-noskip").split()[4] == "n/a" and "5.7" not in cells(table, "fbcache-noskip")
    assert cells(table, "baseline").split()[4] == "1.00x"  # the reference stays 1.00x
    doc = document(rows, {}, {})
    assert len(doc["warnings"]) == 1 and "--repeats 3" in doc["warnings"][0]
    assert doc["rows"][1]["speedup_verdict"] == TOO_FEW_ROUNDS
    assert format_markdown(rows).splitlines()[-1].startswith("warning: 2 timed rounds")


def test_the_chart_draws_the_spread_and_marks_noise(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flux2_accel.optim.bench import report

    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    rows = synthetic_rows([1.0, 2.0, 1.0], {"fast": [0.5, 1.0, 0.52], "noisy": [0.1, 2.0, 1.0]})
    report.plot(tmp_path / "c.png", rows, "synthetic")
    ax = seen["fig"].axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"fast", f"noisy ({WITHIN_NOISE})"} <= labels and "fast (within noise)" not in labels
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    spans = sorted(tuple(round(v, 2) for v in seg[:, 1]) for c in bars for seg in c.lines[2][0].get_segments())
    assert (1.0, 10.0) in spans and (1.92, 2.0) in spans
    few = synthetic_rows([1.0, 1.0], {"fast": [0.5, 0.5]})
    seen.clear()
    report.plot(tmp_path / "d.png", few, "synthetic")
    ax = seen["fig"].axes[0]
    assert "fast" not in {t.get_text() for t in ax.texts} and "fewer than 3" in ax.get_title()


# ---------------------------------------------------------------- the work folder goes, however the bench stops

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_bench_stopped_by_a_signal_removes_its_work_folder(tmp_path, signum):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = ["bench", "--config", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--repeats", "100000",
            "--warmup", "0", "--text-tokens", "8", "--rows", "pack-bf16", "--device", "cpu"]
    code = "import sys\nfrom flux2_accel.optim.cli import main as cli\nsys.exit(cli.main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # a deadline for a loaded machine, not a timing assertion
        while not list(tmp_path.glob("flux2-accel-bench-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        folders = list(tmp_path.glob("flux2-accel-bench-*"))
        assert len(folders) == 1
        time.sleep(1.0)  # into the timed rounds
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGINT), stderr[-2000:]
    assert not folders[0].exists() and not list(tmp_path.glob("flux2-accel-bench-*"))


# ---------------------------------------------------------------- all-on: the features composed

@pytest.fixture(scope="module")
def all_on_run(tmp_path_factory):
    return run_bench(tiny_options(tmp_path_factory.mktemp("bench"), rows=("fbcache-half", "all-on"), steps=ALL_ON_STEPS, warmup=1, warmup_steps=2))


def test_default_rows_hold_all_on_and_leave_the_gpu_only_rows_out():
    assert {"all-on", "fbcache-half", "compile"} <= set(DEFAULT_ROWS) and BenchOptions().rows == DEFAULT_ROWS
    assert not {"nf4-offload", "attn-cudnn", "attn-flash", "attn-sage", "cp2", "cp4"} & set(DEFAULT_ROWS)
    assert set(DEFAULT_ROWS) < set(ROW_NAMES)


def test_all_on_composes_fp8_compile_and_the_cache(all_on_run):
    rows, machine = all_on_run
    row = by_name(rows)
    half, all_on = row["fbcache-half"], row["all-on"]
    assert half.status == OK and all_on.status == OK, (half.reason, all_on.reason)
    # fbcache-half: a threshold calibrated on the baseline's trajectory, skipping about half the steps
    assert abs(half.skipped_steps - ALL_ON_STEPS / 2) <= max(1, ALL_ON_STEPS / 8)
    assert machine["fbcache_half_threshold"] == half.stats["settings"]["threshold"] == \
        all_on.stats["settings"]["cache_threshold"]
    # all-on: the same decisions on fp8 weights under compiled blocks, no recompile on the timed run
    assert (all_on.computed_steps, all_on.skipped_steps) == (half.computed_steps, half.skipped_steps)
    assert all_on.stats["cache"]["skipped_steps"] == all_on.skipped_steps
    assert all_on.recompiles == 0 and all_on.stats["compile"]["compiled"] and all_on.stats["compile"]["graphs"] == 0
    assert all_on.compile_s_cold > 0 and all_on.compile_s_warm is None
    assert all_on.stats["settings"]["precision"] == "fp8_e4m3fn" and "no fp8 matmuls" in all_on.note
    assert all_on.stats["attention"] == {"asked": "sdpa", "backend": "native", "fallback": None}
    # deviation: fp8 rounding on top of the cache's own, both small
    assert 0 < half.rel_l2 < 0.02 and 0 < all_on.rel_l2 < 0.03
    assert all_on.psnr > 35


def test_bad_attention_backend_is_refused_naming_the_option(tmp_path):
    with pytest.raises(InputError, match="--attention-backend is 'fast'.*auto, sdpa"):
        run_bench(tiny_options(tmp_path, attention_backend="fast"))


def test_a_row_that_raises_is_recorded_and_the_others_run(monkeypatch, tmp_path):
    from flux2_accel.optim.bench.runner import FAIL_ROWS_ENV

    monkeypatch.setenv(FAIL_ROWS_ENV, "fp8")
    rows, _ = run_bench(tiny_options(tmp_path, rows=("fp8", "pack-bf16"), steps=2, interleave=False))
    row = by_name(rows)
    assert row["fp8"].status == "error" and FAIL_ROWS_ENV in row["fp8"].reason and row["fp8"].rel_l2 is None
    assert row["pack-bf16"].status == OK and row["pack-bf16"].max_abs_diff == 0


def test_a_spent_time_budget_reports_the_rows_not_started(tmp_path):
    rows, _ = run_bench(tiny_options(tmp_path, rows=("pack-bf16", "fp8"), steps=2, interleave=False, deadline_s=0))
    row = by_name(rows)
    assert row["baseline"].status == OK  # the reference always runs
    for name in ("pack-bf16", "fp8"):
        assert row[name].status == "unavailable" and "time budget" in row[name].reason
