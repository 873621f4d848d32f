"""How long `flux2-accel` takes to answer help and argument errors (issue 23: under 1 s), one line per case.

    python scripts/cli_start_time.py [--repeats N]

Each case runs the installed console script in a fresh process (the time a user waits) and reports the fastest of
N runs, with whether torch was loaded (it should not be for any of these).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from flux2_accel.optim.cli.main import COMMANDS  # torch-free, as the command line's start is

CASES = (
    ["--help"],
    *([name, "--help"] for name in COMMANDS),  # every subcommand's help
    ["genrate"],
    ["bench", "--config", "huge"],
    ["generate", "--demo", "--width", "0"],
    ["generate", "--demo", "--steps", "100000"],
    ["generate", "--transformer", "missing.safetensors"],
    ["serve-text-encoder", "--text-encoder", "x", "--port", "99999"],
)
PROBE = ("import sys\nsys.argv = ['flux2-accel', *sys.argv[1:]]\ntry:\n"
         "    from flux2_accel.optim.cli.main import main\n    main()\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write('torch loaded: %s\\n' % ('torch' in sys.modules))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    script = shutil.which("flux2-accel")
    if script is None:
        sys.exit("flux2-accel is not on PATH: install the pack (pip install -e .) in the active environment.")
    for case in CASES:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([script, *case], capture_output=True, check=False)
            best = min(best, time.perf_counter() - t0)
        probe = subprocess.run([sys.executable, "-c", PROBE, *case], capture_output=True, text=True, check=False)
        loaded = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "?"
        print(f"{best:6.2f} s  {loaded:18}  flux2-accel {' '.join(case)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
