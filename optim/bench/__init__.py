"""`flux2-accel bench`: the pack against bare diffusers, side by side, in one run.

Builds a random-weight FLUX.2 transformer (and VAE, and seeded random text embeddings) of a chosen size, runs every
row on the same embeddings, seed and size, and reports time, memory and fidelity against the `baseline` row (bare
diffusers), each speedup with the spread of its per-round ratios. Rows are listed in `rows.ROWS`; the JSON schema is
documented in docs/benchmark.md. The package imports nothing (settings.py, the names and defaults, stays torch-free
for `--help`); runner.py runs the rows, measure.py measures them and judges their ratios, report.py writes them out;
the subcommand's runner is optim/cli/bench.py.

    flux2-accel bench                                  # small config, 128x128, 6 steps (docs/performance.md: time)
    flux2-accel bench --config dev --height 1024 --width 1024 --steps 28 --json dev.json --plot dev.png
"""
