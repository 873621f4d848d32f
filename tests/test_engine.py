"""The one run path (`optim.run.engine.run`): non-finite latents stop the run, work is bounded by the device's memory,
and the CLI reports user errors in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flux2_accel.optim.cli import main as cli
from flux2_accel.optim.errors import InputError, NonFiniteError
from flux2_accel.optim.handle import ModelHandle, VaeHandle
from flux2_accel.optim.models import tiny
from flux2_accel.optim.models.text_encoding import Flux2Conditioning
from flux2_accel.optim.run import engine, memory
from flux2_accel.optim.run.sampling import SamplingParams, sample
from flux2_accel.optim.run.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts():
    comps = tiny.build_components(tiny.TINY, seed=3)
    store = ModelStore()
    model, vae = ModelHandle("<engine test transformer>", family="dev"), VaeHandle("<engine test vae>")
    store.get(model.base_key, lambda: comps.transformer)
    store.get(vae.base_key, lambda: comps.vae)
    cond = Flux2Conditioning(torch.randn(1, 8, comps.transformer.config.joint_attention_dim,
                                         generator=torch.Generator().manual_seed(0)), "mistral")
    return comps, store, model, vae, cond


def test_run_matches_sample_and_decode(parts):
    from flux2_accel.optim.run import latents

    comps, store, model, vae, cond = parts
    params = SamplingParams(64, 48, 2, 4.0, 7, 1)
    result = engine.run(model, vae, cond, params, store=store, device="cpu")
    want = sample(comps.transformer, comps.vae, cond, params)
    assert torch.equal(result.latent, want)
    assert torch.equal(result.image, latents.decode(comps.vae, want))
    assert result.report.params == params
    assert engine.run(model, vae, cond, params, store=store, device="cpu", decode=False).image is None


def test_nan_after_the_first_step_stops_the_run_and_names_the_causes(parts):
    comps, store, model, vae, cond = parts
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan")

    hook = comps.transformer.single_transformer_blocks[-1].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError) as caught:
            engine.run(model, vae, cond, SamplingParams(64, 64, 5, 4.0, 0, 1), store=store, device="cpu")
    finally:
        hook.remove()
    assert len(calls) == 1  # stopped after step 1 of 5
    message = str(caught.value)
    assert "after step 1 of 5" in message and "fp8" in message and "LoRA" in message and "precision" in message
    assert "<engine test transformer>" in message and "precision bf16" in message
    assert isinstance(caught.value, InputError.__mro__[1])  # a pack error (Flux2AccelError)


def test_estimate_grows_with_the_job_and_follows_the_formula():
    cfg = dict(num_attention_heads=2, attention_head_dim=16, joint_attention_dim=96, in_channels=16)
    one = memory.estimate_run_bytes(cfg, width=64, height=64, batch_size=1, text_tokens=512, act_bytes=4,
                                    vae_channels=32)
    tokens = 16
    assert one == (tokens + 512) * 32 * 4 * memory.ACTIVATION_FACTOR + 512 * 96 * 4 \
        + tokens * 16 * 4 * memory.LATENT_COPIES + 64 * 64 * 32 * 4 * memory.DECODE_FACTOR
    assert memory.estimate_run_bytes(cfg, width=64, height=64, batch_size=10, text_tokens=512, act_bytes=4,
                                     vae_channels=32) == 10 * one


def test_a_job_larger_than_the_device_is_refused_before_sampling(parts, monkeypatch):
    comps, store, model, vae, cond = parts
    calls = []
    hook = comps.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"batch_size 100000 at 64x64 needs about [\d.]+ GiB .* has [\d.]+ GiB "
                                             r"available"):
            engine.run(model, vae, cond, SamplingParams(64, 64, 2, 4.0, 0, 100000), store=store, device="cpu")
        monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # a device with 1 MiB free
        with pytest.raises(InputError, match="batch_size 1 at 64x64 .* has 0.0 GiB available"):
            engine.run(model, vae, cond, SamplingParams(64, 64, 2, 4.0, 0, 1), store=store, device="cpu")
    finally:
        hook.remove()
    assert calls == []  # refused before the first transformer call
    monkeypatch.undo()
    assert engine.run(model, vae, cond, SamplingParams(64, 64, 1, 4.0, 0, 4), store=store, device="cpu",
                      decode=False).latent.shape[0] == 4


def test_cli_refuses_a_huge_batch_in_one_line(capsys):
    argv = ["generate", "--demo", "--steps", "1", "--width", "8192", "--height", "8192", "--batch-size", "64"]
    assert cli.main(argv + ["-o", "/tmp/x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: batch_size 64 at 8192x8192 needs about"), err


@pytest.mark.parametrize("argv, words", [
    (["generate", "--demo", "--steps", "1", "--reference", "/nonexistent/ref.png"], "--reference '/nonexistent"),
    (["generate", "--demo", "--steps", "1", "-o", "/nonexistent/dir/x.png"], "--output '/nonexistent/dir/x.png'"),
    (["generate", "--demo", "--device", "nonsense"], "--device 'nonsense'"),
    (["bench", "--rows", "fp16"], "unknown rows fp16"),
])
def test_user_errors_print_one_line_and_exit_2(argv, words, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert "Traceback" not in err


def test_cli_process_exits_2_without_traceback(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    done = subprocess.run([sys.executable, "-m", "flux2_accel.optim.cli", "generate", "--transformer", missing,
                           "--vae", missing, "--text-encoder", missing],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: ") and "missing.safetensors" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "flux2_accel.optim.cli", "generate", "--steps", "many"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--steps" in bad.stderr
