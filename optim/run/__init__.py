"""One sampling job: the store of loaded modules, `engine.run` (the one run path), sampling, latents, the memory
check and offloading. Other folders import the modules directly."""
