"""torch.compile for FLUX.2: regional by default, compiled once and kept, never failing a prompt.

A handle asks for compiled code with `ModelHandle.compile = CompileSettings(...)` (None runs eager). The `compile`
feature compiles lazily, at the first sampling, and keeps the compiled callables per base module
(`store.states`, see optim.features.api), one set per distinct settings: a later run with the same settings reuses them.

How it is switched on and off: `nn.Module.__call__` runs `module._compiled_call_impl` when it is set (that is all
`module.compile()` does). Each run installs this attribute on the compiled modules (the repeated transformer blocks,
or the whole transformer) and removes it when the run ends, so a handle without compile runs the exact eager module,
and switching between compiled and eager handles costs two attribute writes, no recompile.

What does not recompile: prompts, seeds, step counts, guidance are tensor values; LoRA strengths are 0-dim tensors
(optim.features.lora keeps them so, and declares `prepare_for_compile`, called before each compiled run); the step cache
decides in Python between blocks, outside the compiled regions. A new resolution or batch size recompiles once: dynamo's
automatic dynamic shapes (dynamic="auto") make the changed dimensions symbolic on the first change, so every later
size reuses that graph. Each distinct set of enabled LoRAs compiles once and is then reused.

Fallback: each compiled module is called through `_GuardedCall`. If the compiled call raises (no C++ compiler, no
triton, an unsupported op, fullgraph with a graph break...), the same call is run eagerly: if that works, the
failure was compile's, so the settings are marked failed, a warning is logged once, every module goes back to eager
and the prompt goes on. An error eager raises too is the run's own error and propagates unchanged.

Persistent caches: inductor's FX graph cache, AOTAutograd cache and autotune results live in TORCHINDUCTOR_CACHE_DIR,
which `configure_caches` points to a folder the pack owns (`<root>/inductor`); the mega-cache
(`torch.compiler.save_cache_artifacts`) is written to `<root>/mega-cache/` after a run that compiled, and loaded
once per process. Root: $FLUX2_ACCEL_COMPILE_CACHE, else the settings' cache_dir (the node passes ComfyUI's user
directory), else an existing TORCHINDUCTOR_CACHE_DIR (used as is, no mega-cache), else <temp>/flux2-accel/compile-cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError
from .api import Feature, feature_state
from .compile_settings import DYNAMIC, MODES, SCOPES, CompileSettings, compile_settings  # noqa: F401 (re-exported)

log = logging.getLogger("flux2_accel")

CACHE_ENV = "FLUX2_ACCEL_COMPILE_CACHE"
MEGA_CACHE_DIR = "mega-cache"
MEGA_CACHE_KEEP = 16  # per-process files kept
STATE_KEY = "compile"
_notes: dict = {}  # one-time log lines already written


# ---------------------------------------------------------------- dynamo counters

def graph_count() -> int:
    """Graphs dynamo compiled in this process (all backends): the counter recompile tests read."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


# ---------------------------------------------------------------- compiled sets

class CompiledSet:
    """The compiled callables for one settings on one module tree, installed per run on `targets`."""

    def __init__(self, settings: CompileSettings, targets: list[torch.nn.Module], what: str):
        self.settings = settings
        self.what = what
        # One compiled function for every target, taking the module as its first argument (what `module.compile()`
        # does with a bound method, minus a strong reference from the compiled code to each module).
        self.compiled = torch.compile(torch.nn.Module._call_impl, **settings.torch_compile_kwargs())
        self.calls = [_GuardedCall(self, module) for module in targets]
        self.failure: str | None = None
        self.breaks_reported = False
        self.runs = 0
        # per-run statistics, reset by `begin_run`
        self.compile_s = 0.0
        self.graphs = 0
        self.recompiles = 0

    def begin_run(self) -> None:
        self.compile_s, self.graphs, self.recompiles = 0.0, 0, 0

    def install(self) -> None:
        if self.failure is None:
            for call in self.calls:
                module = call.module_ref()
                if module is not None:
                    module._compiled_call_impl = call

    def uninstall(self) -> None:
        for call in self.calls:
            module = call.module_ref()
            if module is not None and getattr(module, "_compiled_call_impl", None) is call:
                module._compiled_call_impl = None

    def fail(self, error: BaseException) -> None:
        self.failure = _reason(error)
        self.uninstall()
        log.warning("flux2-accel: torch.compile failed for the %s (%s); running eager instead. Settings: %s",
                    self.what, self.failure, _describe(self.settings))

    def stats(self) -> dict:
        return {"compiled": self.failure is None, "scope": self.settings.scope,
                "compile_s": round(self.compile_s, 3), "graphs": self.graphs, "recompiles": self.recompiles,
                "fallback": self.failure}


class _GuardedCall:
    """A module's compiled call that falls back to the eager call when compiling (or the compiled code) fails."""

    def __init__(self, owner: CompiledSet, module: torch.nn.Module):
        self.owner = owner
        self.module_ref = weakref.ref(module)  # installed on the module itself: no reference cycle through it
        self.warm = False  # compiled code ran once: graphs compiled after this are recompiles

    def __call__(self, *args, **kwargs):
        owner, module = self.owner, self.module_ref()
        if owner.failure is not None:
            return module._call_impl(*args, **kwargs)
        graphs = graph_count()
        start = time.perf_counter()
        try:
            output = owner.compiled(module, *args, **kwargs)
        except Exception as error:
            # Eager decides whose error it is: one eager raises too belongs to the run, not to compile.
            output = module._call_impl(*args, **kwargs)
            owner.fail(error)
            return output
        new = graph_count() - graphs
        if new:
            owner.compile_s += time.perf_counter() - start
            owner.graphs += new
            if self.warm:
                owner.recompiles += new
        self.warm = True
        return output


def _reason(error: BaseException) -> str:
    """'BackendCompilerFailed: RuntimeError: no C++ compiler': the wrapper's name and the root cause's message."""
    root = error
    while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    lines = [line for line in str(root).strip().splitlines() if line.strip()]
    head = f"{type(error).__name__}: " if root is not error else ""
    return f"{head}{type(root).__name__}: {lines[0][:300] if lines else ''}"


def _describe(settings: CompileSettings) -> str:
    backend = settings.backend if isinstance(settings.backend, str) else getattr(settings.backend, "__name__", "custom")
    return (f"scope={settings.scope} mode={settings.mode} dynamic={settings.dynamic} fullgraph={settings.fullgraph} "
            f"backend={backend}")


def regional_targets(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks diffusers lists in `_repeated_blocks` (what `compile_repeated_blocks` compiles)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise InputError(f"regional compile needs repeated blocks; {type(model).__name__} lists none. "
                         "Use scope 'full'.")
    return blocks


@dataclass
class CompileState:
    """One live module's compiled sets, by settings' code key."""

    sets: dict = field(default_factory=dict)


def compiled_set_for(store, key, module, settings: CompileSettings, what: str,
                     targets: Callable[[], list]) -> CompiledSet:
    """The compiled set for `settings` on `module` (the base under `key` in `store`; a loose module when `store` is
    None), made on first use. A reloaded base starts uncompiled."""
    state = feature_state(store, key, STATE_KEY, module, CompileState)
    compiled = state.sets.get(settings.code_key)
    if compiled is None:
        compiled = state.sets[settings.code_key] = CompiledSet(settings, targets(), what)
    return compiled


@contextlib.contextmanager
def compiled_run(compiled: CompiledSet, report: Any | None, stats_key: str):
    """Compiled code installed for one run; eager again afterwards, whatever happens."""
    breaks_before = _graph_breaks()
    compiled.begin_run()
    compiled.install()
    try:
        yield compiled
    finally:
        compiled.uninstall()
        compiled.runs += 1
        _warn_graph_breaks_once(compiled, breaks_before)
        if compiled.graphs:
            save_mega_cache(compiled.settings)
        if report is not None:
            report.stats[stats_key] = compiled.stats()


def _warn_graph_breaks_once(compiled: CompiledSet, before: dict) -> None:
    """Quantized layers (fp8, nf4) or custom ops may not trace: dynamo compiles around them. Say so once."""
    if compiled.breaks_reported or compiled.failure is not None or not compiled.graphs:
        return
    after = _graph_breaks()
    new = {reason: n - before.get(reason, 0) for reason, n in after.items() if n > before.get(reason, 0)}
    if new:
        compiled.breaks_reported = True
        reasons = "; ".join(f"{r[:120]} (x{n})" for r, n in sorted(new.items(), key=lambda kv: -kv[1])[:3])
        log.warning("flux2-accel: torch.compile compiled the %s around %d graph break(s); those parts run eager: %s",
                    compiled.what, sum(new.values()), reasons)


# ---------------------------------------------------------------- the feature

@contextlib.contextmanager
def activate(store, transformer, handle, report):
    settings = handle.compile
    if settings is None:
        yield
        return
    settings.validate()
    configure_caches_safely(settings.cache_dir)
    features = store.features if store is not None else ()
    if settings.scope == "full" and any(f.decides_in_forward and f.decides_in_forward(handle) for f in features):
        # The step cache decides in Python inside the forward, around per-run state: a whole-forward graph would
        # guard on that state and recompile every run. Its blocks compile regionally instead.
        if not _notes.get("full_with_cache"):
            _notes["full_with_cache"] = True
            log.info("flux2-accel: compile scope 'full' with a step cache compiles the blocks (regional) instead")
        settings = dataclasses.replace(settings, scope="regional")
    targets = (lambda: regional_targets(transformer)) if settings.scope == "regional" else (lambda: [transformer])
    compiled = compiled_set_for(store, handle.base_key, transformer, settings, f"transformer ({settings.scope})",
                                targets)
    if compiled.failure is None:
        for feature in features:  # what the other features declare compiled code needs (LoRA: tensor strengths)
            if feature.prepare_for_compile is not None:
                feature.prepare_for_compile(transformer)
    with compiled_run(compiled, report, "compile"):
        yield


FEATURE = Feature("compile", activate)


@contextlib.contextmanager
def vae_decoder_compiled(vae, settings: CompileSettings | None, report: Any | None = None):
    """The VAE decoder compiled (with `settings`, when it asks for it) around a decode; eager otherwise.

    Use around `latents.decode(vae, latent)`: `with vae_decoder_compiled(vae, model_handle.compile, report): ...`.
    Compiled code is kept per VAE module, like the transformer's."""
    if settings is None or not settings.compile_vae_decoder:
        yield
        return
    settings.validate()
    configure_caches_safely(settings.cache_dir)
    decoder = vae.decoder
    compiled = compiled_set_for(None, None, decoder, settings, "VAE decoder", lambda: [decoder])
    with compiled_run(compiled, report, "compile_vae"):
        yield


# ---------------------------------------------------------------- persistent caches

_configured: dict = {"inductor_dir": None, "root": None, "mega_loaded": set()}


def resolve_cache_root(cache_dir: str = "") -> Path | None:
    """Where the pack's compile caches live; None when the user's own TORCHINDUCTOR_CACHE_DIR is kept."""
    chosen = os.environ.get(CACHE_ENV) or cache_dir
    if chosen:
        return Path(chosen).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") and _configured["inductor_dir"] is None:
        return None
    return Path(tempfile.gettempdir()) / "flux2-accel" / "compile-cache"


def configure_caches(cache_dir: str = "") -> Path | None:
    """Point inductor's on-disk caches at the pack's folder and load its mega-cache once per process.
    Returns the cache root (None when an existing TORCHINDUCTOR_CACHE_DIR is used as is)."""
    root = resolve_cache_root(cache_dir)
    _enable_disk_caches()
    if root is None:
        return None
    inductor_dir = str((root / "inductor").resolve())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != inductor_dir:
        os.makedirs(inductor_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        with contextlib.suppress(Exception):  # forget paths memoized for a previous cache dir
            from torch._inductor.utils import clear_caches

            clear_caches()
    _configured["inductor_dir"] = inductor_dir
    _configured["root"] = root
    load_mega_cache(root)
    return root


def configure_caches_safely(cache_dir: str = "") -> Path | None:
    """`configure_caches`, where a folder that cannot be used only costs the persistence (warned once)."""
    try:
        return configure_caches(cache_dir)
    except Exception as e:
        if not _notes.get("cache_dir_failed"):
            _notes["cache_dir_failed"] = True
            log.warning("flux2-accel: compile cache folder unusable (%s); compiling without the pack's cache", e)
        return None


def _enable_disk_caches() -> None:
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        inductor_config.autotune_local_cache = True
        functorch_config.enable_autograd_cache = True


def _trusted_file(path: Path) -> bool:
    """The mega-cache holds serialized compiled artifacts: load only a file this user wrote and nobody else can."""
    try:
        st = path.stat()
    except OSError:
        return False
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        log.warning("flux2-accel: ignoring compile mega-cache %s: not owned by this user or writable by others", path)
        return False
    return True


def _mega_cache_dir(root: Path) -> Path:
    return root / MEGA_CACHE_DIR


def load_mega_cache(root: Path) -> int:
    """Load every mega-cache file under `root` once per process (newest last); returns how many loaded."""
    folder = _mega_cache_dir(root)
    key = str(folder.resolve())
    if key in _configured["mega_loaded"]:
        return 0
    _configured["mega_loaded"].add(key)
    loaded = 0
    for path in sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime):
        if not _trusted_file(path):
            continue
        try:
            if torch.compiler.load_cache_artifacts(path.read_bytes()) is not None:
                loaded += 1
                continue
            problem = "unreadable"
        except Exception as e:  # a stale or foreign cache only costs a cold compile
            problem = str(e)
        log.warning("flux2-accel: compile mega-cache %s could not be loaded (%s); compiling cold", path, problem)
    return loaded


_PROCESS_TOKEN = f"{int(time.time())}-{os.getpid()}"


def save_mega_cache(settings: CompileSettings | None = None) -> Path | None:
    """Write what this process compiled so far. torch serializes only artifacts created in this process, so each
    process keeps its own file (rewritten as it grows) and loading reads them all; the oldest are pruned."""
    root = _configured["root"]
    if root is None:
        return None
    try:
        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return None
        folder = _mega_cache_dir(root)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_PROCESS_TOKEN}.bin"
        tmp = folder / f"{_PROCESS_TOKEN}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(saved[0])
        os.replace(tmp, path)
        for old in sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime)[:-MEGA_CACHE_KEEP]:
            old.unlink(missing_ok=True)
        return path
    except Exception as e:
        log.warning("flux2-accel: compile mega-cache could not be saved (%s)", e)
        return None
