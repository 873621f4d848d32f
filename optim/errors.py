"""User-facing errors. Every message names the file or field at fault and says what to do."""


class Flux2AccelError(ValueError):
    """Base class: a problem with what the user gave us, not a bug."""


class ModelFileError(Flux2AccelError):
    """A model file or folder is missing, unreadable, or not what the loader expects."""


class InputError(Flux2AccelError):
    """A widget or argument value is out of range or inconsistent."""


class Interrupted(Exception):
    """Sampling was stopped between steps at the user's request."""


class NonFiniteError(Flux2AccelError):
    """A run produced NaN or Inf values (a model file, LoRA or precision at fault), caught instead of a black image."""


class ParallelError(Flux2AccelError):
    """A multi-GPU run could not start or its actor group failed (Ray missing, an actor died, too few GPUs)."""


class ServeError(Flux2AccelError):
    """The serve app could not start: Ray Serve missing, the port taken, the ingress failing."""
