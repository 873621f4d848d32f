"""`flux2-accel bench`: a tiny run checks the schema and that the values make sense (no timing assertions)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from flux2_accel.optim import cli
from flux2_accel.optim.bench.runner import BenchOptions, run_bench
from flux2_accel.optim.bench.models import CONFIGS
from flux2_accel.optim.bench.report import document, format_table, write_json
from flux2_accel.optim.bench.rows import DEFAULT_ROWS, OK, ROW_NAMES, RowResult
from flux2_accel.optim.errors import InputError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmark.md"
STEPS = 3
# Compile is left out of the suite's run: its cold compile alone takes tens of seconds on a CPU. all-on compiles
# too, with aot_eager (no code generation).
TINY_ROWS = tuple(r for r in DEFAULT_ROWS if r != "compile")
ALL_ON_STEPS = 8  # enough steps for fbcache-half to skip about half


def tiny_options(**changes) -> BenchOptions:
    base = dict(config="tiny", height=64, width=64, steps=STEPS, repeats=1, warmup=0, device="cpu", rows=TINY_ROWS,
                text_tokens=8, compile_backend="aot_eager")
    return BenchOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny_run():
    return run_bench(tiny_options())


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
    assert table.splitlines()[0].split()[:3] == ["row", "status", "s/step"]
    assert all(any(line.startswith(r.name + " ") for line in table.splitlines()) for r in rows)


def test_cli_runs_rows_one_after_another_and_writes_files(tmp_path, capsys):
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


def test_bad_options_are_refused_with_the_valid_choices():
    with pytest.raises(InputError, match="unknown rows fp16.*baseline"):
        run_bench(tiny_options(rows=("fp16",)))
    with pytest.raises(InputError, match="--steps is 0"):
        run_bench(tiny_options(steps=0))


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


def test_compile_row_measures_cold_and_warm_compiles_and_no_recompiles():
    rows, _ = run_bench(tiny_options(rows=("compile",), repeats=2))
    r = by_name(rows)["compile"]
    assert r.status == OK, r.reason
    assert r.compile_s_warm < r.compile_s_cold and r.recompiles == 0
    assert r.stats["compile"]["compiled"] and r.stats["compile_cold_process"]["fallback"] is None
    assert r.rel_l2 < 0.02  # inductor's bf16 kernels round differently from eager, nothing more


def test_speedup_pairs_rounds_when_rows_are_interleaved():
    from flux2_accel.optim.bench.runner import speedup

    baseline, row = [1.0, 2.0, 1.2], [0.5, 1.0, 0.6]  # the machine slowed down in round 2, for both rows alike
    assert speedup(baseline, row, paired=True) == 2.0
    assert speedup(baseline, [0.5, 1.0, 0.7], paired=True) == 2.0  # median of 2.0, 2.0, 1.71
    assert speedup(baseline, [0.5, 1.0, 0.6], paired=False) == pytest.approx(1.2 / 0.6)
    assert speedup([1.0, 2.0], [0.5, 1.0, 0.6], paired=True) == pytest.approx(1.5 / 0.6)  # unequal: medians


# ---------------------------------------------------------------- all-on: the features composed

@pytest.fixture(scope="module")
def all_on_run():
    return run_bench(tiny_options(rows=("fbcache-half", "all-on"), steps=ALL_ON_STEPS, warmup=1, warmup_steps=2))


def test_default_rows_hold_all_on_and_leave_the_gpu_only_rows_out():
    assert {"all-on", "fbcache-half", "compile"} <= set(DEFAULT_ROWS) and BenchOptions().rows == DEFAULT_ROWS
    assert not {"nf4-offload", "attn-cudnn", "attn-flash", "attn-sage"} & set(DEFAULT_ROWS)
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


def test_bad_attention_backend_is_refused_naming_the_option():
    with pytest.raises(InputError, match="--attention-backend is 'fast'.*auto, sdpa"):
        run_bench(tiny_options(attention_backend="fast"))


def test_a_row_that_raises_is_recorded_and_the_others_run(monkeypatch):
    from flux2_accel.optim.bench.runner import FAIL_ROWS_ENV

    monkeypatch.setenv(FAIL_ROWS_ENV, "fp8")
    rows, _ = run_bench(tiny_options(rows=("fp8", "pack-bf16"), steps=2, interleave=False))
    row = by_name(rows)
    assert row["fp8"].status == "error" and FAIL_ROWS_ENV in row["fp8"].reason and row["fp8"].rel_l2 is None
    assert row["pack-bf16"].status == OK and row["pack-bf16"].max_abs_diff == 0


def test_a_spent_time_budget_reports_the_rows_not_started():
    rows, _ = run_bench(tiny_options(rows=("pack-bf16", "fp8"), steps=2, interleave=False, deadline_s=0))
    row = by_name(rows)
    assert row["baseline"].status == OK  # the reference always runs
    for name in ("pack-bf16", "fp8"):
        assert row[name].status == "unavailable" and "time budget" in row[name].reason
