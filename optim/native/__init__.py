"""ComfyUI's FLUX.2 call and its conditioning, in pure torch: what the nodes hand ComfyUI's own sampler and what
they take back from it. Other folders import the modules directly."""
