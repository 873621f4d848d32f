"""One image on several GPUs: an actor group on Ray that runs `engine.run` on every rank with context parallelism
(optim.features.context_parallel) or CFG splitting, and hands back rank 0's result. `group.run` is the entry; it
falls through to `engine.run` for a model without a Parallel setting."""
