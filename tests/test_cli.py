"""`flux2-accel generate`: the engine without ComfyUI."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from flux2_accel.optim.cli import main as cli
from PIL import Image
from safetensors.torch import save_file


def test_demo_writes_an_image_and_says_it_is_noise(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["generate", "--demo", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert "noise" in capsys.readouterr().out


def test_generate_from_files_matches_the_engine(tiny_models, tmp_path):
    from flux2_accel.optim.models import loading
    from flux2_accel.optim.run import latents
    from flux2_accel.optim.run.sampling import SamplingParams, sample

    f = tiny_models.files
    out = tmp_path / "img.png"
    args = ["generate", "--transformer", str(f["dev_comfy"]), "--vae", str(f["vae_ldm"]), "--text-encoder",
            str(f["mistral_comfy"]), "--prompt", "a red dog", "--width", "48", "--height", "32", "--steps", "2",
            "--seed", "9", "-o", str(out)]
    assert cli.main(args) == 0
    te = loading.load_text_encoder(f["mistral_comfy"])
    lat = sample(loading.load_transformer(f["dev_comfy"]), loading.load_vae(f["vae_ldm"]), te.encode("a red dog"),
                 SamplingParams(48, 32, 2, 4.0, 9))
    want = latents.to_pil(latents.decode(loading.load_vae(f["vae_ldm"]), lat))[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_missing_arguments_are_named(capsys):
    assert cli.main(["generate"]) == 2
    assert "--transformer, --text-encoder, --vae" in capsys.readouterr().err


def test_bad_file_is_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"xx")
    assert cli.main(["generate", "--transformer", str(bad), "--vae", str(bad), "--text-encoder", str(bad)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- refusals: exit 2, one line, the flag named

def run_cli(capsys, argv) -> tuple[int, list[str]]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _refused(capsys, argv, *named):
    code, err = run_cli(capsys, argv)
    assert code == 2, err
    assert len(err) == 1, err
    for word in named:
        assert word in err[0], (word, err[0])
    return err[0]


DEMO = ["generate", "--demo"]


@pytest.mark.parametrize("argv,named", [
    (DEMO + ["--width", "0"], ["--width", "16", "8192"]),
    (DEMO + ["--width", "-16"], ["--width"]),
    (DEMO + ["--height", "8208"], ["--height", "8192"]),
    (DEMO + ["--height", "40"], ["--height", "multiple of 16"]),
    (DEMO + ["--steps", "0"], ["--steps", "200"]),
    (DEMO + ["--steps", "-3"], ["--steps"]),
    (DEMO + ["--steps", "100000"], ["--steps", "200"]),
    (DEMO + ["--batch-size", "0"], ["--batch-size", "64"]),
    (DEMO + ["--batch-size", "65"], ["--batch-size", "64"]),
    (DEMO + ["--seed", "-1"], ["--seed"]),
    (DEMO + ["--guidance", "nan"], ["--guidance"]),
    (DEMO + ["--cache-method", "nope"], ["--cache-method"]),
    (DEMO + ["--precision", "fp4"], ["--precision"]),
    (DEMO + ["--cache-threshold", "0.1"], ["--cache-threshold", "--cache-method"]),
    (DEMO + ["--compile-fullgraph"], ["--compile-fullgraph", "--compile"]),
    (DEMO + ["--transformer", "missing.safetensors"], ["--demo", "--transformer"]),
    (DEMO + ["--lora", "missing.safetensors:0.5"], ["--lora", "missing.safetensors"]),
    (DEMO + ["--reference", "missing.png"], ["--reference", "missing.png"]),
    (DEMO + ["-o", "flux2"], ["--output", ".png"]),
    (DEMO + ["-o", "/nonexistent-folder/x.png"], ["--output", "/nonexistent-folder"]),
    (["serve-text-encoder", "--text-encoder", "x", "--port", "99999"], ["--port", "65535"]),
    (["serve-text-encoder", "--text-encoder", "x", "--port", "0"], ["--port"]),
    (["calibrate-teacache", "--demo", "--steps", "1000"], ["--steps"]),
    (["bench", "--config", "tiny", "--json", "/nonexistent-folder/b.json"], ["--json", "/nonexistent-folder"]),
])
def test_values_that_cannot_be_honoured_are_refused_before_any_work(capsys, argv, named):
    _refused(capsys, argv, *named)


def test_every_missing_file_is_listed_with_its_flag(capsys, tmp_path):
    line = _refused(capsys, ["generate", "--transformer", str(tmp_path / "t.safetensors"), "--text-encoder",
                             str(tmp_path / "te.safetensors"), "--vae", str(tmp_path / "v.safetensors")],
                    "--transformer", "--text-encoder", "--vae")
    assert "t.safetensors" in line and "te.safetensors" in line and "v.safetensors" in line


def test_missing_arguments_are_each_named(capsys):
    _refused(capsys, ["generate", "--vae", "x"], "--transformer", "--text-encoder", "--demo")


def test_an_output_folder_gets_its_own_message(capsys, tmp_path):
    _refused(capsys, DEMO + ["-o", str(tmp_path)], "--output", "is a folder")
    _refused(capsys, ["calibrate-teacache", "--demo", "-o", str(tmp_path)], "--output", "is a folder")
    _refused(capsys, ["bench", "--config", "tiny", "--json", str(tmp_path)], "--json", "is a folder")


def test_queue_given_a_folder_says_so(capsys, tmp_path):
    _refused(capsys, ["queue", str(tmp_path)], "is a folder")


def test_serve_refuses_a_port_in_use_before_loading(capsys, monkeypatch):
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", "t")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _refused(capsys, ["serve-text-encoder", "--text-encoder", "not-loaded", "--port", str(port)],
                 f"--port {port}", "cannot listen")


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_embedding_cache_size_setting_is_checked(monkeypatch, value):
    from flux2_accel.nodes import remote
    from flux2_accel.optim.errors import InputError

    monkeypatch.setenv(remote.CACHE_MB_ENV, value)
    with pytest.raises(InputError, match="FLUX2_ACCEL_EMBEDDING_CACHE_MB"):
        remote.cache_max_bytes()
    monkeypatch.setenv(remote.CACHE_MB_ENV, "1.5")
    assert remote.cache_max_bytes() == int(1.5 * 1024**2)


# ---------------------------------------------------------------- fast start: no torch before the arguments are good

@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in cli.COMMANDS),
                                  ["generate", "--demo", "--width", "0"],
                                  ["generate", "--transformer", "missing.safetensors"], ["genrate"],
                                  ["bench", "--config", "huge"], ["serve-text-encoder", "--port", "99999"]])
def test_help_and_argument_errors_load_no_model_library(argv):
    code = ("import sys\nfrom flux2_accel.optim.cli import main as cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('LOADED', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120).stdout
    assert "LOADED []" in out, out


# ---------------------------------------------------------------- every feature flag acts

def test_generate_with_every_feature_flag_reports_each_feature(tiny_models, tmp_path, capsys):
    f = tiny_models.files
    klein = tiny_models.klein.transformer
    target = next(n for n, m in klein.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks.0"
                  in n)
    width = klein.get_submodule(target)
    lora = tmp_path / "style.safetensors"
    save_file({f"transformer.{target}.lora_A.weight": torch.randn(2, width.in_features) * 0.01,
               f"transformer.{target}.lora_B.weight": torch.randn(width.out_features, 2) * 0.01}, str(lora))
    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(reference)
    out = tmp_path / "img.png"
    argv = ["generate", "--transformer", str(f["klein_comfy"]), "--vae", str(f["vae_ldm"]),
            "--text-encoder", str(f["qwen_comfy"]), "--tokenizer", str(tiny_models.root / "text_encoders" /
                                                                        "qwen3_comfy_tokenizer"),
            "--precision", "fp8_e4m3fn", "--text-encoder-precision", "fp8_e4m3fn", "--offload", "none",
            "--attention-backend", "sdpa", "--prompt", "a red dog", "--negative-prompt", "blurry",
            "--reference", str(reference), "--width", "64", "--height", "48", "--steps", "4", "--guidance", "3",
            "--batch-size", "2", "--cache-method", "fbcache", "--cache-threshold", "5", "--cache-warmup-steps", "1",
            "--cache-min-steps", "0", "--cache-max-consecutive-cached", "0", "--compile", "--compile-backend",
            "eager", "--lora", f"{lora}:0.5", "-o", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    stats = dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line and "=" in line)
    assert "precision=fp8_e4m3fn" in stats["model"]
    assert stats["text encoder"] == "precision=fp8_e4m3fn"
    assert "asked=sdpa" in stats["attention"]
    assert "style.safetensors x0.5" in stats["lora"] and "2/2" in stats["lora"]  # both matrices matched
    skipped = int(stats["cache"].split("skipped_steps=")[1].split(",")[0])
    assert skipped > 0
    assert "total_steps=8" in stats["cache"]  # the negative prompt acted: CFG, two branches x 4 steps
    assert "compiled=True" in stats["compile"] and int(stats["compile"].split("graphs=")[1].split(",")[0]) > 0
    images = [tmp_path / "img_1.png", tmp_path / "img_2.png"]
    assert [Image.open(p).size for p in images] == [(64, 48)] * 2


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_names_a_runner_and_functions_that_exist(name):
    """The references are strings (for a fast start); a module moved without them would fail only when run."""
    command = cli.COMMANDS[name]
    for reference in filter(None, (command.arguments, command.check)):
        assert callable(cli._function(reference)), reference
    runner = importlib.import_module(command.runner, cli.__package__)
    assert callable(runner.run), command.runner
