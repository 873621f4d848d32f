"""The `flux2-accel serve` configuration: one TOML file, read and checked whole before Ray starts.

Every refusal is a ServeConfigError naming the file and the key (`models.flux2-dev.step_cache.threshold`). The
tables, with their defaults, are documented in docs/serving.md and shown by examples/serve.toml:

    [server]           bind address and port, the API key's environment variable, limits
    [text_encoders.X]  a text encoder the models share: its file (or the remote endpoint), its GPUs, batching
    [models.NAME]      what `model: NAME` serves: files, precision, LoRAs, step cache, compile, attention backend,
                       GPUs and replicas per model

`demo_config()` is the embedded default of `serve --demo`: the tiny random-weight components, on this machine's CPU.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError
from ...features.caching import DEFAULT_THRESHOLDS, METHODS, CacheSettings, cache_settings
from ...features.compile_settings import CompileSettings, compile_settings
from ...features.parallel_settings import ParallelSettings, rank_resources
from ...options import (ATTENTION_BACKENDS, MAX_GUIDANCE, MAX_PARALLEL_GPUS, MAX_RESOLUTION, MAX_STEPS,
                        PARALLEL_MODES, SIZE_MULTIPLE, TEXT_ENCODER_PRECISIONS, TRANSFORMER_PRECISIONS)
from ..openai_api import DEFAULT_MAX_N, MAX_BODY_BYTES, is_loopback
from ..openai_models import MODEL_NAME
from ..remote.urls import validate_url

DEFAULT_PORT = 8000
DEFAULT_API_KEY_ENV = "FLUX2_ACCEL_API_KEY"
DEMO_MODEL = "flux2-demo"
DEMO_SIZE = 64  # the tiny demo VAE decodes 64x64 in milliseconds
DEMO_TEXT_ENCODER = "demo"
MAX_CONFIG_BYTES = 1024 * 1024


class ServeConfigError(InputError):
    """The serve configuration file cannot be used: names the file and the key at fault."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key_env: str = DEFAULT_API_KEY_ENV  # the environment variable holding the bearer key (never the key itself)
    allow_open: bool = False  # beyond loopback with no key set: refused unless this is set explicitly
    max_n: int = DEFAULT_MAX_N
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float = 900.0
    retry_after_s: int = 1  # the Retry-After a 429 carries
    graceful_shutdown_timeout_s: float = 60.0  # how long a stopping replica may finish its running requests

    def api_key(self, environ=None) -> str | None:
        return (environ if environ is not None else os.environ).get(self.api_key_env) or None


@dataclass(frozen=True)
class TextEncoderConfig:
    """A text encoder deployment. demo: the tiny random-weight one. endpoint_url: a `serve-text-encoder` (or
    compatible) server instead of local weights; its token follows the Remote Text Encode node's rules
    (FLUX2_ACCEL_REMOTE_TOKEN, bound to its host: optim/serve/remote/client.py)."""
    name: str
    file: str | None = None
    tokenizer: str | None = None
    precision: str = "bf16"
    demo: bool = False
    endpoint_url: str | None = None
    num_gpus: float = 0.0  # 0: on a CPU
    num_cpus: float = 1.0
    replicas: int = 1
    max_batch_size: int = 8  # Serve's request batching; 1 turns it off
    batch_wait_timeout_s: float = 0.01
    cache_entries: int = 256  # prompts whose embeddings stay in memory (0: no cache)


@dataclass(frozen=True)
class ReplicaConfig:
    """replicas: a fixed count, or autoscaling between min_replicas and max_replicas on ongoing requests."""
    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0
    max_ongoing_requests: int = 1  # requests a replica runs at once (each holds the GPU)
    max_queued_requests: int = 4  # waiting per deployment handle; beyond it a request gets 429

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


@dataclass(frozen=True)
class ModelConfig:
    """What `model: name` serves. demo: the tiny random-weight components (transformer, vae unused)."""
    name: str
    text_encoder: str
    transformer: str | None = None
    vae: str | None = None
    demo: bool = False
    precision: str = "bf16"
    attention_backend: str = "auto"
    loras: tuple = ()  # (file, strength) pairs, in order
    cache: CacheSettings | None = None
    compile: CompileSettings | None = None
    gpus_per_replica: float = 1.0  # 0: on a CPU; 2+: the replica runs the multi-GPU actor group (parallel)
    parallel: str = "ulysses"
    num_cpus: float = 1.0
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    width: int = 1024
    height: int = 1024
    steps: int = 28  # quality "auto"
    guidance: float = 4.0
    distilled: bool = False  # quality presets of a few steps ([klein] distilled)

    @property
    def parallel_settings(self) -> ParallelSettings | None:
        if self.gpus_per_replica < 2:
            return None
        return ParallelSettings(gpus=int(self.gpus_per_replica), mode=self.parallel)


@dataclass(frozen=True)
class ServeConfig:
    server: ServerConfig
    text_encoders: dict  # name -> TextEncoderConfig
    models: dict  # name -> ModelConfig
    source: str = "<built-in>"

    def check_security(self, environ=None) -> None:
        """Binding beyond loopback with no key set is refused unless allow_open says so explicitly."""
        if self.server.api_key(environ) or self.server.allow_open or is_loopback(self.server.host):
            return
        raise ServeConfigError(
            f"{self.source}: server.host is '{self.server.host}', beyond loopback, and ${self.server.api_key_env} "
            "is not set: set the API key in that environment variable, or allow open access explicitly "
            "(server.allow_open = true, or --allow-open).")

    def with_server(self, **changes) -> "ServeConfig":
        values = {name: getattr(self.server, name) for name in ServerConfig.__dataclass_fields__}
        values.update({k: v for k, v in changes.items() if v is not None})
        return ServeConfig(ServerConfig(**values), self.text_encoders, self.models, self.source)


INGRESS_NAME = "ApiIngress"  # the Serve deployment of the OpenAI routes


def generator_name(model: str) -> str:
    """The Serve deployment that runs model `model`."""
    return f"Generator:{model}"


def text_encoder_name(encoder: str) -> str:
    """The Serve deployment of text encoder `encoder`."""
    return f"TextEncoder:{encoder}"


def text_encoder_options(encoder: TextEncoderConfig) -> dict:
    """Serve's deployment options for a text encoder: its replicas and resources, and room for the requests Serve
    gathers into batches."""
    return {"name": text_encoder_name(encoder.name), "num_replicas": encoder.replicas,
            "ray_actor_options": {"num_cpus": encoder.num_cpus, "num_gpus": encoder.num_gpus},
            "max_ongoing_requests": max(16, encoder.max_batch_size * 2)}


def generator_options(model: ModelConfig, server: ServerConfig, on_gpu: bool = True) -> dict:
    """Serve's deployment options for a model's Generator: fixed replicas or autoscaling on ongoing requests, the
    bound on running and queued requests, its resources.

    A replica of 2+ GPUs drives the multi-GPU actor group, whose ranks hold the GPUs themselves (on_gpu: the cluster
    has GPUs; without, each rank is a CPU). Serve reserves them with the replica as one placement group, packed on
    one machine, so that a replica starts only where all its ranks fit, and its ranks (Ray places a replica's
    child actors in its group) talk over that machine's links. The replica shares rank 0's bundle."""
    replica = model.replica
    scaling = ({"autoscaling_config": {"min_replicas": replica.min_replicas, "max_replicas": replica.max_replicas,
                                       "target_ongoing_requests": replica.target_ongoing_requests}}
               if replica.autoscaling else {"num_replicas": replica.replicas})
    parallel = model.gpus_per_replica > 1
    options = {"name": generator_name(model.name), "max_ongoing_requests": replica.max_ongoing_requests,
               "max_queued_requests": replica.max_queued_requests,
               "graceful_shutdown_timeout_s": server.graceful_shutdown_timeout_s,
               "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": 0 if parallel else model.gpus_per_replica},
               **scaling}
    if parallel:
        bundles = [dict(rank_resources(on_gpu)) for _ in range(int(model.gpus_per_replica))]
        bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + model.num_cpus
        options["placement_group_bundles"] = [{k: v for k, v in bundle.items() if v} for bundle in bundles]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


# --- reading ---------------------------------------------------------------------------------------------------

def load_config(path) -> ServeConfig:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ServeConfigError(f"{path}: {size:,} bytes, more than a configuration file may be "
                                   f"({MAX_CONFIG_BYTES:,}).")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"the serve configuration '{path}' cannot be read ({e}).") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ServeConfigError(f"{path} is not valid TOML: {e}.") from None
    return parse_config(data, str(path), base=path.parent)


def parse_config(data: dict, source: str = "<config>", base: Path | None = None) -> ServeConfig:
    table = _Table(data, "", source, base or Path.cwd())
    table.only("server", "text_encoders", "models")
    server = _server(table.table("server"))
    encoders = {name: _text_encoder(name, sub) for name, sub in table.table("text_encoders").tables()}
    models_table = table.table("models")
    models = {name: _model(name, sub, encoders) for name, sub in models_table.tables()}
    if not models:
        raise ServeConfigError(f"{source}: no [models.NAME] table: list at least one model to serve.")
    return ServeConfig(server, encoders, models, source)


def demo_config(replicas: int = 1, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **replica) -> ServeConfig:
    """`serve --demo`: the tiny random-weight model `flux2-demo`, its replicas and the text encoder on CPUs."""
    encoder = TextEncoderConfig(DEMO_TEXT_ENCODER, demo=True, num_cpus=0)
    model = ModelConfig(DEMO_MODEL, DEMO_TEXT_ENCODER, demo=True, gpus_per_replica=0, num_cpus=0,
                        replica=ReplicaConfig(replicas=replicas, **replica), width=DEMO_SIZE, height=DEMO_SIZE,
                        steps=4)
    return ServeConfig(ServerConfig(host=host, port=port), {encoder.name: encoder}, {model.name: model})


class _Table:
    """Typed reads of one TOML table that name the key at fault (`models.x.precision`) in every refusal."""

    def __init__(self, data: dict, prefix: str, source: str, base: Path):
        self.data, self.prefix, self.source, self.base = data, prefix, source, base

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ServeConfigError:
        return ServeConfigError(f"{self.source}: {self.key(name)} {message}")

    def only(self, *names) -> None:
        for name in self.data:
            if name not in names:
                raise self.error(name, f"is not a known key; this table takes {', '.join(names)}.")

    def table(self, name: str) -> "_Table":
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table, not {type(value).__name__}.")
        return _Table(value, self.key(name), self.source, self.base)

    def tables(self):
        for name, value in self.data.items():
            if not isinstance(value, dict):
                raise self.error(name, f"must be a table, not {type(value).__name__}.")
            if not MODEL_NAME.fullmatch(name):
                raise self.error(name, "is not a usable name: letters, digits, '.', '_' and '-', at most 64.")
            yield name, _Table(value, self.key(name), self.source, self.base)

    def get(self, name: str, kind, default, low=None, high=None, choices=None):
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.error(name, f"must be {_KIND_NAMES[kind]}, not {value!r}.")
        if kind is float and not math.isfinite(value):
            raise self.error(name, f"must be a finite number, not {value!r}.")
        if low is not None and value < low or high is not None and value > high:
            raise self.error(name, f"is {value!r}: it must be between {low} and {high}.")
        if choices is not None and value not in choices:
            raise self.error(name, f"is {value!r}: choose one of {', '.join(map(str, choices))}.")
        return value

    def path(self, name: str, required: bool) -> str | None:
        value = self.get(name, str, None)
        if value is None:
            if required:
                raise self.error(name, "is required (the file's path).")
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.base / path
        if not path.exists():
            raise self.error(name, f"names '{path}', which does not exist.")
        return str(path.resolve())


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array"}


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    t.only(*ServerConfig.__dataclass_fields__)
    env = t.get("api_key_env", str, d.api_key_env)
    if not env.replace("_", "").isalnum():
        raise t.error("api_key_env", f"is '{env}': it names an environment variable (letters, digits, '_'); the key "
                      "itself never goes in the file.")
    return ServerConfig(
        host=t.get("host", str, d.host), port=t.get("port", int, d.port, 1, 65535), api_key_env=env,
        allow_open=t.get("allow_open", bool, d.allow_open), max_n=t.get("max_n", int, d.max_n, 1, 64),
        max_body_bytes=t.get("max_body_bytes", int, d.max_body_bytes, 1024, 1024**3),
        request_timeout_s=t.get("request_timeout_s", float, d.request_timeout_s, 1.0, 86400.0),
        retry_after_s=t.get("retry_after_s", int, d.retry_after_s, 1, 3600),
        graceful_shutdown_timeout_s=t.get("graceful_shutdown_timeout_s", float, d.graceful_shutdown_timeout_s, 0.0,
                                          3600.0))


def _text_encoder(name: str, t: _Table) -> TextEncoderConfig:
    d = TextEncoderConfig(name)
    t.only(*(f for f in TextEncoderConfig.__dataclass_fields__ if f != "name"))
    demo = t.get("demo", bool, False)
    endpoint = t.get("endpoint_url", str, None)
    if sum((demo, endpoint is not None, "file" in t.data)) != 1:
        raise ServeConfigError(f"{t.source}: {t.prefix} needs exactly one of file, endpoint_url or demo = true.")
    if endpoint is not None:
        try:
            validate_url(endpoint, t.key("endpoint_url"))
        except InputError as e:
            raise ServeConfigError(f"{t.source}: {e}") from None
    return TextEncoderConfig(
        name, file=t.path("file", False), tokenizer=t.path("tokenizer", False),
        precision=t.get("precision", str, d.precision, choices=TEXT_ENCODER_PRECISIONS), demo=demo,
        endpoint_url=endpoint,
        num_gpus=t.get("num_gpus", float, d.num_gpus, 0.0, 8.0), num_cpus=t.get("num_cpus", float, d.num_cpus, 0.0, 256.0),
        replicas=t.get("replicas", int, d.replicas, 1, 64),
        max_batch_size=t.get("max_batch_size", int, d.max_batch_size, 1, 256),
        batch_wait_timeout_s=t.get("batch_wait_timeout_s", float, d.batch_wait_timeout_s, 0.0, 10.0),
        cache_entries=t.get("cache_entries", int, d.cache_entries, 0, 100_000))


_MODEL_KEYS = ("transformer", "vae", "text_encoder", "demo", "precision", "attention_backend", "loras", "step_cache",
               "compile", "gpus_per_replica", "parallel", "num_cpus", "replicas", "width", "height", "steps",
               "guidance", "distilled")


def _model(name: str, t: _Table, encoders: dict) -> ModelConfig:
    d = ModelConfig(name, "")
    t.only(*_MODEL_KEYS)
    demo = t.get("demo", bool, False)
    encoder = t.get("text_encoder", str, None)
    if encoder is None:
        raise t.error("text_encoder", f"is required: the name of a [text_encoders.X] table ({_names(encoders)}).")
    if encoder not in encoders:
        raise t.error("text_encoder", f"is '{encoder}', which no [text_encoders.{encoder}] table defines "
                      f"({_names(encoders)}).")
    gpus = t.get("gpus_per_replica", float, d.gpus_per_replica, 0.0, float(MAX_PARALLEL_GPUS))
    if gpus > 1 and gpus != int(gpus):
        raise t.error("gpus_per_replica", f"is {gpus}: above 1 it is a whole number of GPUs (the parallel group).")
    values = dict(
        transformer=None if demo else t.path("transformer", True), vae=None if demo else t.path("vae", True),
        demo=demo, precision=t.get("precision", str, d.precision, choices=TRANSFORMER_PRECISIONS),
        attention_backend=t.get("attention_backend", str, d.attention_backend, choices=ATTENTION_BACKENDS),
        loras=_loras(t), cache=_step_cache(t.table("step_cache")), compile=_compile(t.table("compile")),
        gpus_per_replica=gpus, parallel=t.get("parallel", str, d.parallel, choices=PARALLEL_MODES),
        num_cpus=t.get("num_cpus", float, d.num_cpus, 0.0, 256.0), replica=_replicas(t),
        width=_size(t, "width", d.width), height=_size(t, "height", d.height),
        steps=t.get("steps", int, d.steps, 1, MAX_STEPS), guidance=t.get("guidance", float, d.guidance, 0.0, MAX_GUIDANCE),
        distilled=t.get("distilled", bool, d.distilled))
    if demo:
        for key in ("transformer", "vae"):
            if key in t.data:
                raise t.error(key, "does not go with demo = true (the demo's weights are built in).")
        if gpus > 1:
            raise t.error("gpus_per_replica", f"is {gpus:g}: the demo's weights live in one process, and a parallel "
                          "group's ranks load theirs from files; give transformer and vae files.")
    return ModelConfig(name, encoder, **values)


def _names(encoders: dict) -> str:
    return "defined: " + ", ".join(sorted(encoders)) if encoders else "none is defined"


def _size(t: _Table, name: str, default: int) -> int:
    value = t.get(name, int, default, SIZE_MULTIPLE, MAX_RESOLUTION)
    if value % SIZE_MULTIPLE:
        raise t.error(name, f"is {value}: it must be a multiple of {SIZE_MULTIPLE}.")
    return value


def _loras(t: _Table) -> tuple:
    entries = t.get("loras", list, [])
    specs = []
    for index, entry in enumerate(entries):
        item = _Table(entry if isinstance(entry, dict) else {}, f"{t.key('loras')}[{index}]", t.source, t.base)
        if not isinstance(entry, dict):
            raise ServeConfigError(f"{t.source}: {item.prefix} must be a table {{ file = \"...\", strength = 1.0 }}.")
        item.only("file", "strength")
        specs.append((item.path("file", True), item.get("strength", float, 1.0, -10.0, 10.0)))
    return tuple(specs)


def _step_cache(t: _Table) -> CacheSettings | None:
    if not t.data:
        return None
    d = CacheSettings()
    t.only("method", "threshold", "start_percent", "end_percent", "max_consecutive_cached", "warmup_steps",
           "teacache_coefficients", "min_steps")
    method = t.get("method", str, None, choices=METHODS)
    if method is None:
        raise t.error("method", f"is required in a step_cache table: {', '.join(METHODS)}.")
    try:
        return cache_settings(method, t.get("threshold", float, DEFAULT_THRESHOLDS[method], 0.0, 5.0),
                              t.get("start_percent", float, d.start_percent, 0.0, 1.0),
                              t.get("end_percent", float, d.end_percent, 0.0, 1.0),
                              t.get("max_consecutive_cached", int, d.max_consecutive_cached, 0, 100),
                              t.get("warmup_steps", int, d.warmup_steps, 0, 100),
                              t.get("teacache_coefficients", str, ""),
                              t.get("min_steps", int, d.min_steps, 0, MAX_STEPS))
    except InputError as e:
        raise ServeConfigError(f"{t.source}: {t.prefix}: {e}") from None


def _compile(t: _Table) -> CompileSettings | None:
    if not t.data:
        return None
    d = CompileSettings()
    t.only("scope", "mode", "dynamic", "fullgraph", "backend", "compile_vae_decoder")
    try:
        return compile_settings(t.get("scope", str, d.scope), t.get("mode", str, d.mode),
                                t.get("dynamic", str, d.dynamic), t.get("fullgraph", bool, d.fullgraph),
                                t.get("backend", str, d.backend),
                                t.get("compile_vae_decoder", bool, d.compile_vae_decoder))
    except InputError as e:
        raise ServeConfigError(f"{t.source}: {t.prefix}: {e}") from None


def _replicas(model: _Table) -> ReplicaConfig:
    value = model.data.get("replicas", 1)
    d = ReplicaConfig()
    if isinstance(value, int) and not isinstance(value, bool):
        return ReplicaConfig(replicas=model.get("replicas", int, 1, 1, 256))
    t = model.table("replicas")
    t.only("count", "min", "max", "target_ongoing_requests", "max_ongoing_requests", "max_queued_requests")
    common = dict(max_ongoing_requests=t.get("max_ongoing_requests", int, d.max_ongoing_requests, 1, 64),
                  max_queued_requests=t.get("max_queued_requests", int, d.max_queued_requests, 1, 10_000))
    if "min" in t.data or "max" in t.data:
        if "count" in t.data:
            raise t.error("count", "and min/max both set the replicas: give a count, or min and max to autoscale.")
        low, high = t.get("min", int, 1, 0, 256), t.get("max", int, 1, 1, 256)
        if low > high:
            raise t.error("min", f"is {low}, above max {high}.")
        return ReplicaConfig(replicas=None, min_replicas=low, max_replicas=high,
                             target_ongoing_requests=t.get("target_ongoing_requests", float, 1.0, 0.01, 1000.0),
                             **common)
    return ReplicaConfig(replicas=t.get("count", int, 1, 1, 256), **common)
