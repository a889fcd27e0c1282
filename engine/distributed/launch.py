"""The entry point of every rank process: rank 0 serves HTTP, the others follow.

Run as a script, never with `python -m`: `-m` puts the directory a user started openmlx from
first on sys.path, where a file called `engine.py` or a folder called `handlers/` would shadow
openmlx's own packages and kill every rank. Here the script's own folder, which Python puts first,
is replaced by the folder that holds openmlx's packages. The supervisor starts ranks with
`command(argv)`; under `mlx.launch` (hostfiles, MPI) the argument lists come in the environment.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve()
PACKAGES = SCRIPT.parents[2]  # the folder holding engine/ and handlers/


def command(argv: list[str]) -> list[str]:
    """The command line that runs `openmlx ARGV` as a rank."""
    return [sys.executable, str(SCRIPT), *argv]


def _argv_from_environment() -> list[str]:
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if rank == 0:
        os.environ["OPENMLX_RANK_ROLE"] = "serve"
        return ["serve", *json.loads(os.environ["OPENMLX_SERVE_ARGV"])]
    return json.loads(os.environ["OPENMLX_FOLLOW_ARGV"])


if __name__ == "__main__":
    import runpy

    sys.path[0] = str(PACKAGES)
    sys.argv = [sys.argv[0], *(sys.argv[1:] or _argv_from_environment())]
    runpy.run_module("handlers.cli", run_name="__main__", alter_sys=True)  # the server's own entry point
