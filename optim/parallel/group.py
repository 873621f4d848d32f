"""The actor group: one Ray actor per GPU, forming a torch.distributed process group (NCCL on CUDA, gloo on CPU),
each running `engine.run` on its own store with the run's parallel layout; rank 0's result is the run's.

    run(model with ParallelSettings, vae, conditioning, params, ...)
        -> group_for(settings, split by CFG branch or not): warm actors, or new ones (Ray started in-process, or
           joined at RAY_ADDRESS)
        -> every rank: its store materializes the handles from the same files (memory-mapped: one page cache per
           machine), resolves the layout (features.context_parallel.resolve_layout: the same answer on every rank),
           and runs engine.run with it (a CFG-split run: as a one-branch run, the ranks' CfgSplitHook doing both
           branches); the text embeddings come in once, from the caller
        -> rank 0 streams its steps (progress, previews) and hands back latent, image and report

Ranks agree at every step on whether to stop (an all-reduce of their interrupt flags in the pipeline's step
callback), so an interrupt stops all of them after the same step and none waits in a collective for a rank that
left. An actor that dies fails the run with a ParallelError; the group is torn down and the next run builds a new
one. Groups stay warm between runs: the modules, LoRAs and compiled code live in the actors' stores.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import Flux2AccelError, Interrupted, ParallelError
from ..features.caching.decision import TIMELINE_KEY
from ..features.context_parallel import cfg_split, cfg_splittable, resolve_layout, sequence_tokens_check
from ..features.parallel_settings import ParallelSettings, rank_resources
from ..models.arch import family_of
from ..models.text_encoding import Flux2Conditioning
from ..run import engine
from ..run.engine import RunResult
from ..run.latents import spatial_factor
from ..run.sampling import SamplingParams, calls_both_branches, check_conditioning
from ..run.store import STORE, ModelStore

# Ray (the [parallel] extra), imported at first use: ComfyUI imports the pack whether or not a Parallel node runs,
# and importing Ray changes how a process ends on Ctrl-C (exit status 1, not the signal's).
ray = None

log = logging.getLogger("flux2_accel")

INSTALL_HINT = ('Parallel (FLUX.2) runs on Ray, which is not installed in this Python: pip install "ray>=2.50" '
                '(or pip install "flux2-accel[parallel]"), then restart.')
POLL_S = 0.1  # the longest a rank's poll waits for news (a step, or the end) before answering
STRAGGLER_S = 20.0  # after one rank stops, how long the others get to stop too before the group is torn down
JOIN_TIMEOUT_S = 120.0
PACKAGE = __name__[: -len(".optim.parallel.group")]  # "flux2_accel" when installed; ComfyUI names it its own way
PACK_DIR = str(Path(os.path.abspath(__file__)).parents[2])  # not resolved: the folder ComfyUI imported it from


def ray_installed() -> bool:
    return ray is not None or importlib.util.find_spec("ray") is not None


def require_ray():
    """The ray module, imported now if it was not; without it, the install hint."""
    global ray
    if ray is None:
        try:
            ray = importlib.import_module("ray")
        except ImportError:
            raise ParallelError(INSTALL_HINT) from None
    return ray


def worker_setup() -> Callable[[], None]:
    """What every Ray worker runs first: make the pack importable under the name it has in this process.

    Ray sends the actor class by reference (its module's name). Installed with pip, that is `flux2_accel`; inside
    ComfyUI the pack is a folder under custom_nodes/ that ComfyUI imports under a name of its own (0.3x: the folder's
    path), which no worker can import. The workers get a package of that name whose search path is the pack's folder,
    without running its root __init__ (the ComfyUI entry). The function is defined outside any importable module, so
    Ray sends it by value."""
    source = (f"def make_pack_importable():\n"
              f"    import sys, types\n"
              f"    if {PACKAGE!r} not in sys.modules:\n"
              f"        package = types.ModuleType({PACKAGE!r})\n"
              f"        package.__path__ = [{PACK_DIR!r}]\n"
              f"        sys.modules[{PACKAGE!r}] = package\n")
    namespace = {"__name__": "<flux2-accel worker setup>"}
    exec(source, namespace)  # noqa: S102 - the source is built here from two strings of this module
    return namespace["make_pack_importable"]


def ray_started(num_cpus: int | None = None, address: str | None = None, log_to_driver: bool = False) -> None:
    """Ray for this process: the cluster at `address` or RAY_ADDRESS (every machine needs the pack at the same
    path), else a local one started in-process on this machine's CPUs and GPUs, bound to loopback, with no usage
    reporting and no dashboard. num_cpus: what the local one may schedule, where that is not this machine's core
    count (CPU ranks take one each: four ranks on a two-core machine, in the tests). log_to_driver: print the
    workers' logs here (`serve` does; a ComfyUI or a generate run keeps its own output)."""
    require_ray()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray otherwise reports usage to its vendor
    runtime_env = {"worker_process_setup_hook": worker_setup(), "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=runtime_env,
                 log_to_driver=log_to_driver, num_cpus=num_cpus)


def cluster_has_gpus() -> bool:
    """Whether the ranks run on GPUs (NCCL) or, in a cluster without any, on CPUs (gloo)."""
    return ray.cluster_resources().get("GPU", 0) > 0


def check_capacity(gpus: int) -> None:
    """ParallelError when this Ray cluster has fewer GPUs (or, without any, CPUs) than `gpus` ranks need."""
    ray_started()
    on_gpu = cluster_has_gpus()
    available = ray.cluster_resources().get("GPU" if on_gpu else "CPU", 0)
    if available < gpus:
        kind = "GPUs" if on_gpu else "CPUs (no GPU in this Ray cluster)"
        raise ParallelError(f"parallel gpus is {gpus}, and this Ray cluster has {available:g} {kind}: lower "
                            "gpus, or add machines to the cluster (RAY_ADDRESS).")


@dataclass
class Job:
    """One run, as every rank receives it (the embeddings are computed once, by the caller)."""

    model: object  # ModelHandle with ParallelSettings in .parallel
    vae: object
    conditioning: Flux2Conditioning
    params: SamplingParams
    reference_images: object = None
    negative: Flux2Conditioning | None = None
    decode: bool = True
    previews: bool = False


@dataclass
class RankStatus:
    steps: list = field(default_factory=list)  # (i, n, latent or None) since the last poll
    done: bool = False
    result: RunResult | None = None
    error: BaseException | None = None


class Rank:
    """One rank of the group, in its own Ray actor (process). Its store outlives runs: the group stays warm."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.store = ModelStore(max_entries=6)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.news = threading.Condition(self.lock)  # a step recorded, or the job done
        self.status = RankStatus(done=True)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # the ranks share this machine's cores

    def endpoint(self) -> tuple[str, int]:
        """Where rank 0 listens for the others while the process group forms."""
        host = require_ray().util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def join(self, host: str, port: int) -> int:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                             world_size=self.world)
        return os.getpid()

    def agreed_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.is_set() else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def start(self, job: Job) -> None:
        with self.lock:
            if not self.status.done:
                raise ParallelError(f"rank {self.rank} is still running a job")
            self.stop.clear()
            self.status = RankStatus()
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"flux2-accel rank {self.rank}").start()

    def _on_step(self, i: int, n: int, latent_fn, previews: bool) -> None:
        if self.rank == 0:
            latent = latent_fn() if previews else None
            with self.news:
                self.status.steps.append((i, n, latent))
                self.news.notify_all()

    def _run(self, job: Job) -> None:
        result = error = None
        try:
            transformer = self.store.transformer(job.model)
            cfg_run = cfg_active(job.negative, job.params, family_of(transformer))
            layout = resolve_layout(job.model.parallel, transformer.config, cfg_run)
            factor = spatial_factor(self.store.vae(job.vae))
            sequence_tokens_check(layout, (job.params.width // factor) * (job.params.height // factor),
                                  f"{job.params.width}x{job.params.height} image")
            sequence_tokens_check(layout, job.conditioning.prompt_embeds.shape[1], "prompt")
            negative, params, around = job.negative, job.params, ()
            if layout.cfg == 2:
                # One branch for the pipeline: the hook computes the other on the partner rank and guides.
                check_conditioning(transformer, negative, "negative conditioning")
                sequence_tokens_check(layout, negative.prompt_embeds.shape[1], "negative prompt")
                around = (lambda t: cfg_split(t, layout, job.negative.prompt_embeds, job.params.guidance),)
                negative, params = None, dataclasses.replace(job.params, guidance=1.0)
            result = engine.run(job.model.replace(parallel=layout), job.vae, job.conditioning, params,
                                store=self.store, reference_images=job.reference_images, negative=negative,
                                device=self.device, decode=job.decode and self.rank == 0,
                                on_step=lambda i, n, get: self._on_step(i, n, get, job.previews),
                                should_interrupt=self.agreed_stop, around=around)
            result.report.params = job.params
            result.report.stats["parallel"] = {**result.report.stats.get("parallel", {}), "ranks": self.world,
                                               "loads": self.store.load_count}
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller, typed
            error = e if isinstance(e, (Flux2AccelError, Interrupted)) else ParallelError(
                f"rank {self.rank} failed: {type(e).__name__}: {e}")
        with self.news:
            # Rank 0's result is the run's; the negative branch's first rank adds its step cache's decisions.
            negative_lead = result is not None and result.report.stats.get("parallel", {}).get("cfg") == 2 \
                and self.rank == self.world // 2
            self.status.result = result if self.rank == 0 or negative_lead else None
            self.status.error = error
            self.status.done = True
            self.news.notify_all()

    def poll(self, wait_s: float = 0.0) -> RankStatus:
        """The steps since the last poll, and the outcome once the job is done; waits up to `wait_s` for either, so
        the caller hears of the end at once rather than at its next look."""
        with self.news:
            self.news.wait_for(lambda: self.status.steps or self.status.done, timeout=wait_s)
            status, self.status = self.status, RankStatus(done=self.status.done)
            return status

    def interrupt(self) -> None:
        self.stop.set()

    def load_count(self) -> int:
        return self.store.load_count

    def pid(self) -> int:
        return os.getpid()


class Group:
    """`gpus` Rank actors joined into one process group."""

    def __init__(self, gpus: int):
        check_capacity(gpus)
        shape = rank_resources(cluster_has_gpus())
        actor = ray.remote(num_gpus=shape.get("GPU", 0), num_cpus=shape.get("CPU", 0), max_concurrency=4)(Rank)
        self.gpus = gpus
        self.ranks = [actor.remote(r, gpus) for r in range(gpus)]
        try:
            host, port = ray.get(self.ranks[0].endpoint.remote(), timeout=JOIN_TIMEOUT_S)
            self.pids = ray.get([r.join.remote(host, port) for r in self.ranks], timeout=JOIN_TIMEOUT_S)
        except Exception as e:
            self.shutdown()
            raise ParallelError(f"the {gpus} parallel ranks could not form a process group: {e}") from None

    def shutdown(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.ranks = []

    def run(self, job: Job, on_step=None, should_interrupt: Callable[[], bool] | None = None) -> RunResult:
        try:
            ray.get([r.start.remote(job) for r in self.ranks])
            done: dict[int, RankStatus] = {}
            first_done_at = None
            interrupted = False
            while len(done) < len(self.ranks):
                for index, status in enumerate(ray.get([r.poll.remote(POLL_S) for r in self.ranks])):
                    if index == 0 and on_step is not None:
                        for i, n, latent in status.steps:
                            on_step(i, n, lambda latent=latent: latent)
                    if status.done and index not in done:
                        done[index] = status
                        first_done_at = first_done_at or time.monotonic()
                if not interrupted and should_interrupt is not None and should_interrupt():
                    interrupted = True
                    ray.get([r.interrupt.remote() for r in self.ranks])
                if first_done_at and len(done) < len(self.ranks) and time.monotonic() - first_done_at > STRAGGLER_S:
                    waiting = sorted(set(range(len(self.ranks))) - set(done))
                    raise ParallelError(f"parallel ranks {waiting} did not finish {STRAGGLER_S:g} s after rank "
                                        f"{min(done)} stopped ({done[min(done)].error or 'done'}); the group is "
                                        "rebuilt at the next run.")
        except ray.exceptions.RayActorError as e:
            raise ParallelError(f"a parallel rank died during the run ({type(e).__name__}); the group is rebuilt "
                                "at the next run.") from None
        errors = [s.error for s in done.values() if s.error is not None]
        if errors:
            # Every rank fails the same way on a bad input (checked before any collective); anything else is
            # the first rank's error.
            raise errors[0]
        result = done[0].result
        partner = done[len(self.ranks) // 2].result
        if partner is not None and partner is not result:
            merge_negative_branch(result.report.stats, partner.report.stats)
        return result

    def load_counts(self) -> list[int]:
        return ray.get([r.load_count.remote() for r in self.ranks])


def merge_negative_branch(stats: dict, negative_stats: dict) -> None:
    """A CFG-split run's step cache statistics as a one-process run reports them: the negative half ran its branch
    under the pipeline's one branch name ("cond"); here it becomes "uncond" beside the positive branch."""
    cache, other = stats.get("cache"), negative_stats.get("cache")
    if cache is None or other is None:
        return
    for count in ("computed_steps", "skipped_steps", "total_steps"):
        cache[count] += other[count]
    cache["estimated_time_saved_s"] = round(cache["estimated_time_saved_s"] + other["estimated_time_saved_s"], 3)
    timeline = cache.get(TIMELINE_KEY, {})
    for name, decisions in other.get(TIMELINE_KEY, {}).items():
        timeline["uncond" if name == "cond" else f"uncond-{name}"] = decisions


def cfg_active(negative, params: SamplingParams, family: str | None) -> bool:
    """`calls_both_branches`, where the family may be unknown to the caller until the ranks load the model (None or
    "": [klein] assumed)."""
    return calls_both_branches(family or "klein", negative, params)


GroupKey = tuple[ParallelSettings, bool]  # the settings, and whether runs split by CFG branch
_groups: dict[GroupKey, Group] = {}
_groups_lock = threading.Lock()


def group_for(key: GroupKey) -> Group:
    """The warm group for `key`, or a new one. One group at a time: another key first releases the old one (a
    transformer cannot leave the layout it was switched to, so another layout needs fresh ranks)."""
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            check_capacity(key[0].gpus)  # a run the cluster cannot take leaves the warm group as it is
            release()
            group = _groups[key] = Group(key[0].gpus)
        return group


def release() -> None:
    """Tear every group down (ComfyUI's unload and /free, a failed run): the next run starts new actors."""
    for key in list(_groups):
        _groups.pop(key).shutdown()


def run(model, vae, conditioning: Flux2Conditioning, params: SamplingParams, *, store: ModelStore = STORE,
        reference_images=None, negative: Flux2Conditioning | None = None, device=None, decode: bool = True,
        on_step=None, should_interrupt: Callable[[], bool] | None = None, around=()) -> RunResult:
    """`engine.run` for a model with a Parallel setting on its actor group; for any other model, `engine.run`."""
    settings = getattr(model, "parallel", None)
    if settings is None:
        return engine.run(model, vae, conditioning, params, store=store, reference_images=reference_images,
                          negative=negative, device=device, decode=decode, on_step=on_step,
                          should_interrupt=should_interrupt, around=around)
    require_ray()
    settings.validate()
    params.validate()
    if model.cache is not None and model.cache.enabled and model.cache.method == "magcache":
        raise ParallelError("step cache method 'magcache' measures each rank's part of the image on its own, so "
                            "the ranks would disagree on which steps to skip: use fbcache, teacache or taylorseer "
                            "with a Parallel model.")
    if model.offload != "none":
        raise ParallelError(f"offload '{model.offload}' and Parallel do not combine: every rank holds the whole "
                            "model; use fp8 or nf4 to fit it.")
    job = Job(model, vae, conditioning, params, reference_images=reference_images, negative=negative,
              decode=decode, previews=on_step is not None)
    key = (settings, cfg_splittable(settings, cfg_active(negative, params, model.family)))
    group = group_for(key)
    try:
        return group.run(job, on_step=on_step, should_interrupt=should_interrupt)
    except ParallelError:
        with _groups_lock:
            if _groups.get(key) is group:
                release()
        raise
