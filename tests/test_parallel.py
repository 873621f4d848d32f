"""One image on several ranks (optim.parallel): two Ray actors on this CPU form a gloo group and run diffusers'
context parallelism; rank 0's latent must equal the single-process run's. One local Ray per test run (the module's
fixture), bound to loopback."""

from __future__ import annotations

import importlib
import io
import os
import signal
import subprocess
import sys

import layout_fixtures
import numpy as np
import pytest
import torch
from flux2_accel.nodes.bridges import Flux2AccelToModel
from flux2_accel.optim.bench.rows import OK, UNAVAILABLE
from flux2_accel.optim.bench.runner import BenchOptions, run_bench
from flux2_accel.nodes.parallel import Flux2AccelParallel
from flux2_accel.optim.cli.main import main as cli_main
from flux2_accel.optim.errors import InputError, Interrupted, ParallelError
from flux2_accel.optim.features.caching import CacheSettings
from flux2_accel.optim.features.context_parallel import (RankLayout, context_parallel_plan, cpu_device_count_patched,
                                                         resolve_layout)
from flux2_accel.optim.features.lora import LoraSpec
from flux2_accel.optim.features.parallel_settings import ParallelSettings
from flux2_accel.optim.handle import ModelHandle, VaeHandle
from flux2_accel.optim.models.text_encoding import Flux2Conditioning
from flux2_accel.optim.parallel import group
from flux2_accel.optim.run import engine
from flux2_accel.optim.run.sampling import SamplingParams
from flux2_accel.optim.run.store import ModelStore
from flux2_accel.optim.serve.ray_serve.config import ModelConfig, ServerConfig, generator_options
from flux2_accel.optim.serve.ray_serve.jobs import GenerationJob
from flux2_accel.optim.serve.ray_serve.runtime import ServedModel
from PIL import Image
from safetensors.torch import save_file

ray = pytest.importorskip("ray")
placement = pytest.importorskip("ray.util.placement_group")
scheduling = pytest.importorskip("ray.util.scheduling_strategies")


@pytest.fixture(scope="module")
def ray_cluster():
    # As the node and the CLI start it (local, loopback, no usage reporting), with room for four CPU ranks.
    group.ray_started(num_cpus=4)
    assert ray.cluster_resources().get("CPU", 0) == 4
    yield
    group.release()
    ray.shutdown()


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def conditioning(width: int, tokens: int = 16, seed: int = 3, family: str = "mistral") -> Flux2Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Flux2Conditioning(torch.randn(1, tokens, width, generator=g), family)


@pytest.fixture(scope="module")
def dev(tiny_models):
    model = ModelHandle(str(tiny_models.files["dev_diffusers_file"]), precision="bf16", family="dev")
    vae = VaeHandle(str(tiny_models.files["vae_diffusers_file"]), dtype="fp32")
    width = tiny_models.dev.transformer.config.joint_attention_dim
    return model, vae, conditioning(width)


@pytest.fixture(scope="module")
def tiny_lora(tiny_models, tmp_path_factory):
    """A LoRA on every linear layer of the tiny [dev] transformer, proj_out (BFL's final_layer.linear) included."""
    spec = tiny_models.dev.spec
    bfl = layout_fixtures.transformer_to_bfl(tiny_models.dev.transformer.state_dict(), spec.num_layers,
                                             spec.num_single_layers)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key, weight in bfl.items():
        if key.endswith(".weight") and weight.ndim == 2:
            target, (n, k) = key[: -len(".weight")], weight.shape
            lora[f"diffusion_model.{target}.lora_A.weight"] = torch.randn(4, k, generator=g) * 0.2
            lora[f"diffusion_model.{target}.lora_B.weight"] = torch.randn(n, 4, generator=g) * 0.2
    assert "diffusion_model.final_layer.linear.lora_A.weight" in lora
    path = tmp_path_factory.mktemp("lora") / "tiny_lora.safetensors"
    save_file(lora, str(path))
    return path


@pytest.fixture(scope="module")
def klein_base(tiny_models):
    """A [klein] base run with CFG: the model, its VAE, a positive and a negative prompt of different lengths."""
    model = ModelHandle(str(tiny_models.files["klein_diffusers_file"]), precision="bf16", family="klein")
    vae = VaeHandle(str(tiny_models.files["vae_diffusers_file"]), dtype="fp32")
    width = tiny_models.klein.transformer.config.joint_attention_dim
    return model, vae, conditioning(width, family="qwen3"), conditioning(width, tokens=8, seed=8, family="qwen3")


def single(model, vae, cond, params, **kwargs):
    return engine.run(model, vae, cond, params, store=ModelStore(), device="cpu", **kwargs)


PARAMS = SamplingParams(64, 64, 4, 4.0, 7, 1)


@pytest.mark.parametrize("mode", ["ulysses", "auto"])
def test_two_ranks_give_the_single_process_latent(ray_cluster, dev, mode):
    model, vae, cond = dev
    want = single(model, vae, cond, PARAMS)
    got = group.run(model.replace(parallel=ParallelSettings(2, mode)), vae, cond, PARAMS)
    assert rel_l2(got.latent, want.latent) <= 1e-5
    assert got.image.shape == want.image.shape
    stats = got.report.stats["parallel"]
    assert (stats["ulysses"], stats["ring"], stats["ranks"]) == (2, 1, 2)


def test_ring_on_cpu_ranks_is_refused_clearly_and_the_group_stays_usable(ray_cluster, dev):
    """Ring attention merges partial results by their log-sum-exp, which torch's CPU attention does not return."""
    model, vae, cond = dev
    ring = model.replace(parallel=ParallelSettings(2, "ring"))
    with pytest.raises(InputError, match="mode 'ring' needs an attention kernel that returns its log-sum-exp"):
        group.run(ring, vae, cond, PARAMS)
    with pytest.raises(InputError, match="mode 'ring'"):  # the same ranks answer again: none hangs
        group.run(ring, vae, cond, PARAMS)


def test_a_second_prompt_reuses_the_warm_group(ray_cluster, dev):
    model, vae, cond = dev
    handle = model.replace(parallel=ParallelSettings(2, "ulysses"))
    group.run(handle, vae, cond, PARAMS)
    warm = group.group_for((handle.parallel, False))
    loads, pids = warm.load_counts(), list(warm.pids)
    other = SamplingParams(64, 64, 3, 4.0, 99, 1)
    got = group.run(handle, vae, conditioning(cond.prompt_embeds.shape[-1], seed=11), other)
    # Same actors, no reload.
    assert warm.load_counts() == loads and group.group_for((handle.parallel, False)).pids == pids
    want = single(model, vae, conditioning(cond.prompt_embeds.shape[-1], seed=11), other)
    assert rel_l2(got.latent, want.latent) <= 1e-5


def test_batch_two_and_reference_images(ray_cluster, dev):
    model, vae, cond = dev
    params = SamplingParams(64, 64, 3, 4.0, 5, 2)
    refs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    want = single(model, vae, cond, params, reference_images=refs)
    got = group.run(model.replace(parallel=ParallelSettings(2)), vae, cond, params, reference_images=refs)
    assert got.latent.shape[0] == 2 and rel_l2(got.latent, want.latent) <= 1e-5


def test_a_lora_on_every_rank(ray_cluster, dev, tiny_lora):
    model, vae, cond = dev
    with_lora = model.with_loras([LoraSpec(str(tiny_lora), 0.8)])
    want = single(with_lora, vae, cond, PARAMS)
    assert rel_l2(want.latent, single(model, vae, cond, PARAMS).latent) > 1e-4  # the LoRA changes the image
    got = group.run(with_lora.replace(parallel=ParallelSettings(2)), vae, cond, PARAMS)
    assert rel_l2(got.latent, want.latent) <= 1e-5


@pytest.mark.parametrize("method,threshold", [("fbcache", 0.7), ("teacache", 0.6)])
def test_the_step_cache_decides_alike_on_every_rank(ray_cluster, dev, method, threshold):
    model, vae, cond = dev
    cached = model.with_step_cache(CacheSettings(method=method, threshold=threshold, min_steps=0,
                                                 max_consecutive_cached=0))
    params = SamplingParams(64, 64, 10, 4.0, 7, 1)
    want = single(cached, vae, cond, params)
    assert "S" in "".join(want.cache_timeline())  # the threshold makes it skip
    got = group.run(cached.replace(parallel=ParallelSettings(2)), vae, cond, params)
    assert got.cache_timeline() == want.cache_timeline()
    assert rel_l2(got.latent, want.latent) <= 1e-5


@pytest.mark.parametrize("gpus,mode,layout", [(2, "cfg", (1, 1, 2)), (4, "auto", (2, 1, 2))])
def test_cfg_split_gives_the_single_process_latent(ray_cluster, klein_base, gpus, mode, layout):
    """The positive and negative branches on two halves of the ranks; with four, each half also splits its tokens."""
    model, vae, cond, negative = klein_base
    params = SamplingParams(64, 64, 4, 4.0, 7, 2)
    want = single(model, vae, cond, params, negative=negative)
    assert rel_l2(want.latent, single(model, vae, cond, params).latent) > 1e-3  # the negative prompt matters
    got = group.run(model.replace(parallel=ParallelSettings(gpus, mode)), vae, cond, params, negative=negative)
    assert rel_l2(got.latent, want.latent) <= 1e-5
    stats = got.report.stats["parallel"]
    assert (stats["ulysses"], stats["ring"], stats["cfg"], stats["ranks"]) == (*layout, gpus)
    assert got.report.params.guidance == 4.0  # the run's own parameters, not the one-branch pipeline's


def test_cfg_split_with_the_step_cache_keeps_each_branch_timeline(ray_cluster, klein_base):
    model, vae, cond, negative = klein_base
    cached = model.with_step_cache(CacheSettings(method="fbcache", threshold=1.5, min_steps=0,
                                                 max_consecutive_cached=0))
    params = SamplingParams(64, 64, 10, 4.0, 7, 1)
    want = single(cached, vae, cond, params, negative=negative)
    assert [row.split(":")[0] for row in want.cache_timeline()] == ["cond", "uncond"]
    assert "S" in "".join(want.cache_timeline())
    got = group.run(cached.replace(parallel=ParallelSettings(2, "cfg")), vae, cond, params, negative=negative)
    assert got.cache_timeline() == want.cache_timeline()
    assert (got.report.stats["cache"]["computed_steps"], got.report.stats["cache"]["skipped_steps"]) == \
        (want.report.stats["cache"]["computed_steps"], want.report.stats["cache"]["skipped_steps"])
    assert rel_l2(got.latent, want.latent) <= 1e-5


def test_cfg_mode_without_a_second_branch_is_refused(ray_cluster, klein_base, dev):
    model, vae, cond, negative = klein_base
    split = model.replace(parallel=ParallelSettings(2, "cfg"))
    with pytest.raises(InputError, match="mode 'cfg' splits the two branches .* connect a negative prompt"):
        group.run(split, vae, cond, PARAMS)
    with pytest.raises(InputError, match="mode 'cfg'.*only one branch"):  # guidance 1: no CFG either
        group.run(split, vae, cond, SamplingParams(64, 64, 4, 1.0, 7, 1), negative=negative)
    d_model, d_vae, d_cond = dev  # [dev] has no CFG: a negative prompt there gives no second branch
    with pytest.raises(InputError, match="only one branch"):
        group.run(d_model.replace(parallel=ParallelSettings(2, "cfg")), d_vae, d_cond, PARAMS,
                  negative=d_cond)


def test_progress_and_interrupt_stop_every_rank_after_the_same_step(ray_cluster, dev):
    model, vae, cond = dev
    handle = model.replace(parallel=ParallelSettings(2))
    seen = []
    params = SamplingParams(64, 64, 40, 4.0, 1, 1)
    with pytest.raises(Interrupted):
        group.run(handle, vae, cond, params, on_step=lambda i, n, get: seen.append((i, n, get().shape)),
                  should_interrupt=lambda: len(seen) >= 2)
    assert seen[0] == (1, 40, (1, 16, 4, 4)) and len(seen) < 40
    # Both ranks stopped (neither waits in a collective): the same group runs the next prompt.
    got = group.run(handle, vae, cond, PARAMS)
    assert rel_l2(got.latent, single(model, vae, cond, PARAMS).latent) <= 1e-5


def test_a_rank_killed_mid_run_fails_clearly_and_the_next_run_works(ray_cluster, dev):
    model, vae, cond = dev
    handle = model.replace(parallel=ParallelSettings(2))
    group.run(handle, vae, cond, PARAMS)
    victim = group.group_for((handle.parallel, False)).pids[1]
    steps = []

    def kill_after_first_step(i, n, get):
        steps.append(i)
        if i == 1:
            os.kill(victim, signal.SIGKILL)

    with pytest.raises(ParallelError, match="died"):
        group.run(handle, vae, cond, SamplingParams(64, 64, 200, 4.0, 1, 1), on_step=kill_after_first_step)
    got = group.run(handle, vae, cond, PARAMS)
    assert victim not in group.group_for((handle.parallel, False)).pids
    assert rel_l2(got.latent, single(model, vae, cond, PARAMS).latent) <= 1e-5


def test_bad_layouts_are_refused_with_their_numbers(ray_cluster, dev):
    model, vae, cond = dev
    with pytest.raises(InputError, match="2 attention heads over 3 GPUs, and 2 is not divisible by 3"):
        resolve_layout(ParallelSettings(3, "ulysses"), model_config(heads=2))
    assert resolve_layout(ParallelSettings(3, "auto"), model_config(heads=2)) == RankLayout(ring=3)
    assert resolve_layout(ParallelSettings(2, "auto"), model_config(heads=2)) == RankLayout(ulysses=2)
    assert resolve_layout(ParallelSettings(2, "auto"), model_config(heads=2), cfg_run=True) == RankLayout(cfg=2)
    assert resolve_layout(ParallelSettings(8, "cfg"), model_config(heads=4), cfg_run=True) == \
        RankLayout(ulysses=4, cfg=2)
    assert resolve_layout(ParallelSettings(6, "cfg"), model_config(heads=2), cfg_run=True) == \
        RankLayout(ring=3, cfg=2)  # 3 GPUs per branch do not divide 2 heads: ring, as auto does
    assert resolve_layout(ParallelSettings(3, "auto"), model_config(heads=3), cfg_run=True) == RankLayout(ulysses=3)
    with pytest.raises(InputError, match="mode 'cfg' runs the two CFG branches on two halves of the GPUs: gpus is 3"):
        ParallelSettings(3, "cfg").validate()
    with pytest.raises(InputError, match="parallel gpus is 1"):
        ParallelSettings(1).validate()
    with pytest.raises(InputError, match="parallel mode is 'tp'"):
        ParallelSettings(2, "tp").validate()
    with pytest.raises(ParallelError, match="magcache"):
        group.run(model.with_step_cache(CacheSettings(method="magcache", threshold=0.06))
                  .replace(parallel=ParallelSettings(2)), vae, cond, PARAMS)
    # An odd image token count on 2 ranks: refused on every rank before any collective, the group stays usable.
    with pytest.raises(InputError, match="48x48 image has 9 tokens"):
        group.run(model.replace(parallel=ParallelSettings(2)), vae, cond, SamplingParams(48, 48, 2, 4.0, 0, 1))
    warm = group.group_for((ParallelSettings(2), False))
    # More ranks than the cluster holds: refused, and the warm group is neither torn down nor replaced.
    with pytest.raises(ParallelError, match="parallel gpus is 6, and this Ray cluster has 4 CPUs"):
        group.run(model.replace(parallel=ParallelSettings(6)), vae, cond, PARAMS)
    assert group.group_for((ParallelSettings(2), False)) is warm and len(warm.ranks) == 2
    assert group.run(model.replace(parallel=ParallelSettings(2)), vae, cond, PARAMS).latent.isfinite().all()
    assert group.group_for((ParallelSettings(2), False)) is warm


def model_config(heads: int):
    return type("Config", (), {"num_attention_heads": heads})()


def test_the_plan_gathers_after_norm_out_so_a_proj_out_lora_sees_the_whole_sequence(tiny_models):
    plan = context_parallel_plan(tiny_models.dev.transformer)
    assert "proj_out" not in plan and "norm_out" in plan and set(plan[""]) == {
        "hidden_states", "encoder_hidden_states", "img_ids", "txt_ids"}


def test_cpu_ranks_report_one_device_only_while_parallelism_is_enabled():
    before = torch.accelerator.device_count()
    with cpu_device_count_patched():
        assert torch.accelerator.device_count() == max(1, before)
    assert torch.accelerator.device_count() == before


def test_a_parallel_handle_outside_its_group_runs_on_one_device(dev):
    """engine.run on a handle still holding ParallelSettings (not a resolved layout) is a plain run."""
    model, vae, cond = dev
    got = single(model.replace(parallel=ParallelSettings(2)), vae, cond, PARAMS)
    assert rel_l2(got.latent, single(model, vae, cond, PARAMS).latent) == 0.0


def test_workers_import_the_pack_under_the_name_it_has_in_this_process(monkeypatch):
    """Inside ComfyUI the pack's package name is ComfyUI's (0.3x: the folder's path); the workers' setup hook makes
    that name importable from the pack's folder, without running the pack's root __init__ (the ComfyUI entry)."""
    name = "/comfy/custom_nodes/flux2-accel"  # a name no import statement could spell
    monkeypatch.setattr(group, "PACKAGE", name)
    try:
        group.worker_setup()()
        errors = importlib.import_module(f"{name}.optim.errors")
        assert errors.__file__ == os.path.join(group.PACK_DIR, "optim", "errors.py")
        assert f"{name}.nodes" not in sys.modules
    finally:
        for module in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[module]


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, dev):
    model, vae, cond = dev
    monkeypatch.setattr(group, "ray", None)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    with pytest.raises(ParallelError, match='pip install "ray>=2.50"'):
        group.run(model.replace(parallel=ParallelSettings(2)), vae, cond, PARAMS)



def test_generate_with_gpus_2_writes_the_single_process_image(ray_cluster, tiny_models, tmp_path, capsys):
    f = tiny_models.files
    common = ["generate", "--transformer", str(f["dev_diffusers_file"]), "--vae", str(f["vae_diffusers_file"]),
              "--text-encoder", str(f["mistral_comfy"]), "--tokenizer",
              str(tiny_models.root / "text_encoders" / "mistral_comfy_tokenizer"),
              "--width", "64", "--height", "64", "--steps", "3", "--device", "cpu"]
    assert cli_main(common + ["-o", str(tmp_path / "one.png")]) == 0
    two = [a for a in common if a not in ("--device", "cpu")] + ["--gpus", "2", "-o", str(tmp_path / "two.png")]
    assert cli_main(two) == 0
    assert "parallel: ulysses=2, ring=1, cfg=1, ranks=2" in capsys.readouterr().out
    one, two = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("one.png", "two.png"))
    assert one.shape == two.shape == (64, 64, 3) and np.abs(one - two).max() <= 1  # 8-bit rounding at most


def test_the_parallel_node_returns_a_new_handle_and_model_to_comfyui_refuses_it(dev):
    model, _, _ = dev
    (parallel,) = Flux2AccelParallel().apply(model, 2, "ulysses")
    assert parallel.parallel == ParallelSettings(2, "ulysses") and model.parallel is None
    with pytest.raises(InputError, match="went through Parallel"):
        Flux2AccelToModel().convert(parallel)
    with pytest.raises(InputError, match="gpus"):
        Flux2AccelParallel().apply(model, 9, "ulysses")


def test_the_bench_cp_rows_measure_ranks_against_one_process(ray_cluster, tmp_path):
    """cp2 runs its ranks from the files the bench writes; cp4 needs four devices (this cluster lends four CPUs, the
    machine may have fewer cores: then it is unavailable, with the reason)."""
    options = BenchOptions(config="tiny", height=64, width=64, steps=3, repeats=1, warmup=1, device="cpu",
                           rows=("cp2", "cp4"), text_tokens=8, temp_dir=str(tmp_path))
    rows, _ = run_bench(options)
    result = {r.name: r for r in rows}
    assert result["cp2"].status == OK, result["cp2"].note
    assert result["cp2"].rel_l2 is not None and result["cp2"].rel_l2 <= 1e-2  # bf16: shard-sized matmuls round
    assert result["cp2"].stats["parallel"]["ranks"] == 2 and "CPU ranks over gloo" in result["cp2"].note
    if (os.cpu_count() or 1) < 4:
        assert result["cp4"].status == UNAVAILABLE and "4 ranks need 4 CPU cores" in result["cp4"].reason
    else:
        assert result["cp4"].status == OK and result["cp4"].stats["parallel"]["ranks"] == 4
    assert not group._groups  # each row gives its ranks back


def test_importing_the_pack_leaves_ray_unimported():
    """Ray loads at the first parallel run: importing it changes how ComfyUI's process ends on Ctrl-C."""
    code = ("import sys, flux2_accel.nodes, flux2_accel.optim.bench.rows, flux2_accel.optim.parallel.group as g; "
            "assert 'ray' not in sys.modules, 'ray imported'; assert g.ray_installed(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_serve_replica_of_two_gpus_runs_its_group_in_its_placement_group_and_matches_one_process(
        ray_cluster, tiny_models):
    # `flux2-accel serve` with gpus_per_replica = 2: the Generator replica drives the actor group (CPU ranks here),
    # whose ranks fit the replica's placement group and take nothing beside it.
    group.release()

    @ray.remote
    class ServeReplica:
        """A Generator replica as Serve runs one: ServedModel in an actor of its own, scheduled in the replica's
        placement group, which captures the actors it starts (Serve's deployment_scheduler does the same).
        Defined here so that Ray ships the class by value to its worker."""

        def __init__(self, config: ModelConfig):
            self.model = ServedModel(config)

        def generate(self, job: GenerationJob, cond):
            image = self.model.generate(job, cond, None).images[0]
            return image, ray.available_resources().get("CPU", 0)  # while its group's ranks are alive

    files = dict(transformer=str(tiny_models.files["dev_diffusers_file"]),
                 vae=str(tiny_models.files["vae_diffusers_file"]))
    parallel_config = ModelConfig("m", "te", gpus_per_replica=2, parallel="ulysses", num_cpus=0, **files)
    options = generator_options(parallel_config, ServerConfig(), on_gpu=group.cluster_has_gpus())
    pg = placement.placement_group(options["placement_group_bundles"], strategy=options["placement_group_strategy"])
    ray.get(pg.ready(), timeout=60)
    free_beside_the_group = ray.available_resources().get("CPU", 0)
    replica = ServeReplica.options(**options["ray_actor_options"],
                                   scheduling_strategy=scheduling.PlacementGroupSchedulingStrategy(
                                       pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
                                   ).remote(parallel_config)
    job = GenerationJob("p", 64, 64, 4, 4.0, seed=3)
    cond = conditioning(tiny_models.dev.transformer.config.joint_attention_dim)
    try:
        served, free_while_running = ray.get(replica.generate.remote(job, cond), timeout=180)
    finally:
        ray.kill(replica)  # its ranks go with it: it owns them
        placement.remove_placement_group(pg)
    assert free_beside_the_group == 2 and free_while_running == free_beside_the_group
    single = ServedModel(ModelConfig("m", "te", gpus_per_replica=0, **files))
    assert single.model.parallel is None
    a, b = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
            for png in (single.generate(job, cond, None).images[0], served))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 2
