"""`flux2-accel generate`: the engine without ComfyUI."""

from __future__ import annotations

import numpy as np
from PIL import Image

from flux2_accel.optim import cli


def test_demo_writes_an_image_and_says_it_is_noise(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["generate", "--demo", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert "noise" in capsys.readouterr().out


def test_generate_from_files_matches_the_engine(tiny_models, tmp_path):
    from flux2_accel.optim import latents, loading
    from flux2_accel.optim.sampling import SamplingParams, sample

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
