"""How to compile a transformer (the Torch Compile node's widgets, `generate`'s --compile flags): settings only.

Torch-free, so the CLI builds its flags from them without loading torch; optim/features/compile.py does the compiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError

SCOPES = ("regional", "full")
MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DYNAMIC = ("auto", "true", "false")
# Compiled regions share one dynamo cache per code object (every block runs nn.Module._call_impl): block kinds x
# LoRA sets x shape variants add up past dynamo's default of 8, after which it silently runs eager.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSettings:
    """How to compile. Frozen and hashable: it lives inside a ModelHandle.

    scope: "regional" compiles each repeated transformer block (one graph per block kind, reused by all blocks: a
    fast cold start); "full" compiles the whole transformer forward.
    mode: inductor's mode ("default" = none); ignored by other backends.
    dynamic: "auto" (static first, symbolic sizes after the first size change), "true", "false" (one graph per size).
    backend: a torch.compile backend name ("inductor", "aot_eager", "eager"...) or a backend callable.
    compile_vae_decoder: also compile the VAE decoder (see `vae_decoder_compiled`).
    cache_dir: root of the persistent compile caches ("" = default, see module docs).
    """

    scope: str = "regional"
    mode: str = "default"
    dynamic: str = "auto"
    fullgraph: bool = False
    backend: Any = "inductor"
    compile_vae_decoder: bool = False
    cache_dir: str = ""

    def validate(self) -> None:
        for name, allowed in (("scope", SCOPES), ("mode", MODES), ("dynamic", DYNAMIC)):
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"compile {name} is '{value}': choose one of {', '.join(allowed)}.")
        if isinstance(self.backend, str):
            if not self.backend.strip():
                raise InputError("compile backend is empty: use 'inductor' (default), 'aot_eager' or 'eager'.")
            known = backend_names()
            if known and self.backend not in known:  # a typo would otherwise only show as an eager fallback
                raise InputError(f"compile backend '{self.backend}' is not a torch.compile backend here: use "
                                 f"'inductor' (default), 'aot_eager' or 'eager' (installed: {', '.join(known)}).")
        elif not callable(self.backend):
            raise InputError(f"compile backend must be a name or a callable, got {type(self.backend).__name__}.")

    @property
    def code_key(self) -> tuple:
        """What decides the compiled code (cache location and VAE choice do not)."""
        return (self.scope, self.mode, self.dynamic, self.fullgraph, self.backend)

    def torch_compile_kwargs(self) -> dict:
        kwargs = dict(backend=self.backend, fullgraph=self.fullgraph,
                      dynamic={"auto": None, "true": True, "false": False}[self.dynamic],
                      recompile_limit=RECOMPILE_LIMIT)
        if self.mode != "default" and self.backend == "inductor":  # other backends refuse a mode
            kwargs["mode"] = self.mode
        return kwargs


def backend_names() -> list[str]:
    """torch.compile backends registered in this process (empty if dynamo cannot tell)."""
    try:
        import torch._dynamo  # here, not at the top: the settings are read without torch (`flux2-accel --help`)

        return [n for n in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in n]
    except Exception:
        return []


def compile_settings(scope: str, mode: str, dynamic: str, fullgraph: bool, backend: str, compile_vae_decoder: bool,
                     cache_dir: str = "") -> CompileSettings:
    """Validated settings from the Torch Compile node's widgets (or `generate`'s --compile flags, named after them)."""
    settings = CompileSettings(scope, mode, dynamic, bool(fullgraph), str(backend).strip(), bool(compile_vae_decoder),
                               cache_dir)
    settings.validate()
    return settings
