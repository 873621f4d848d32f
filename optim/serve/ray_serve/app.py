"""The Serve application of `flux2-accel serve`: the API ingress bound to one Generator deployment per model and one
TextEncoder deployment per text encoder the models use, each with its replicas, resources and queue bound from the
configuration. Serve does the routing, queueing, restarts and autoscaling."""

from .config import INGRESS_NAME, ServeConfig, generator_name, text_encoder_name
from .ingress import ApiIngress
from .workers import Generator, TextEncoder


def build_app(config: ServeConfig, key_digest: str | None):
    """The Serve application: the ingress bound to one Generator per model and one TextEncoder per encoder used."""
    used = {model.text_encoder for model in config.models.values()}
    encoders = {}
    for name in sorted(used):
        encoder = config.text_encoders[name]
        encoders[name] = TextEncoder.options(
            name=text_encoder_name(name), num_replicas=encoder.replicas,
            ray_actor_options={"num_cpus": encoder.num_cpus, "num_gpus": encoder.num_gpus},
            max_ongoing_requests=max(16, encoder.max_batch_size * 2)).bind(encoder)
    generators = {}
    for name, model in config.models.items():
        replica = model.replica
        scaling = ({"autoscaling_config": {"min_replicas": replica.min_replicas, "max_replicas": replica.max_replicas,
                                           "target_ongoing_requests": replica.target_ongoing_requests}}
                   if replica.autoscaling else {"num_replicas": replica.replicas})
        # A replica of 2+ GPUs drives the multi-GPU actor group, whose ranks hold the GPUs themselves.
        gpus = model.gpus_per_replica if model.gpus_per_replica <= 1 else 0
        generators[name] = Generator.options(
            name=generator_name(name), max_ongoing_requests=replica.max_ongoing_requests,
            max_queued_requests=replica.max_queued_requests,
            graceful_shutdown_timeout_s=config.server.graceful_shutdown_timeout_s,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": gpus}, **scaling,
        ).bind(model, encoders[model.text_encoder])
    return ApiIngress.options(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0},
                              graceful_shutdown_timeout_s=config.server.graceful_shutdown_timeout_s,
                              ).bind(config, key_digest, generators, encoders)
