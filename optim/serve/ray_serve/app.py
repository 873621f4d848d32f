"""The Serve application of `flux2-accel serve`: the API ingress bound to one Generator deployment per model and one
TextEncoder deployment per text encoder the models use, each with its replicas, resources and queue bound from the
configuration. Serve does the routing, queueing, restarts and autoscaling."""

from .config import INGRESS_NAME, ServeConfig, generator_options, text_encoder_options
from .ingress import ApiIngress
from .workers import Generator, TextEncoder


def build_app(config: ServeConfig, key_digest: str | None, on_gpu: bool = True):
    """The Serve application: the ingress bound to one Generator per model and one TextEncoder per encoder used.
    on_gpu: the cluster has GPUs, so a multi-GPU replica's ranks reserve GPUs (else CPUs)."""
    used = sorted({model.text_encoder for model in config.models.values()})
    encoders = {name: TextEncoder.options(**text_encoder_options(config.text_encoders[name]))
                .bind(config.text_encoders[name]) for name in used}
    generators = {name: Generator.options(**generator_options(model, config.server, on_gpu))
                  .bind(model, encoders[model.text_encoder]) for name, model in config.models.items()}
    return ApiIngress.options(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0},
                              graceful_shutdown_timeout_s=config.server.graceful_shutdown_timeout_s,
                              ).bind(config, key_digest, generators, encoders)
