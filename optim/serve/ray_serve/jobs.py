"""What the API ingress hands a Generator (torch-free, so the ingress replica never loads torch): one request's
job with every value resolved, and the result coming back."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..openai_api import QUALITY_STEPS, ImageRequest, encode_image
from ..openai_models import DISTILLED_QUALITY_STEPS
from .config import ModelConfig


@dataclass(frozen=True)
class GenerationJob:
    """One request as a Generator runs it: every value resolved (size, steps, seed), n images in one batch."""
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    references: tuple = ()  # PNG bytes
    partial_images: int = 0
    output_format: str = "png"
    output_compression: int | None = None


@dataclass
class GenerationResult:
    images: list  # encoded in the job's output_format
    replica: str = ""
    seconds: float = 0.0
    stats: list = field(default_factory=list)


def job_for(request: ImageRequest, model: ModelConfig, seed: int) -> GenerationJob:
    """The job of a checked OpenAI request on `model`: size "auto" is the model's, quality maps to steps (a
    distilled model's presets are a few steps), guidance defaults to the model's."""
    width, height = request.size or (model.width, model.height)
    presets = DISTILLED_QUALITY_STEPS if model.distilled else QUALITY_STEPS
    steps = request.steps or presets.get(request.quality) or model.steps
    guidance = model.guidance if request.guidance is None else request.guidance
    references = tuple(encode_image(image, "png") for image in request.images)
    return GenerationJob(request.prompt, width, height, steps, guidance, seed, request.n, request.negative_prompt,
                         references, request.partial_images if request.stream else 0, request.output_format,
                         request.output_compression)


def partial_steps(steps: int, partial_images: int) -> set[int]:
    """The steps after which a stream's partial images are decoded: evenly spread, never the last one."""
    if partial_images <= 0 or steps < 2:
        return set()
    return {max(1, min(steps - 1, round(steps * (i + 1) / (partial_images + 1)))) for i in range(partial_images)}
