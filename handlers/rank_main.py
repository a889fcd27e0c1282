"""Entry point for ranks started by `mlx.launch` (with --hostfile or the MPI backend): rank 0
serves HTTP, the others follow. The supervisor passes both command lines in the environment."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by mlx.launch
    from handlers.cli import main

    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if rank == 0:
        os.environ["OPENMLX_RANK_ROLE"] = "serve"
        main(["serve", *json.loads(os.environ["OPENMLX_SERVE_ARGV"])])
    else:
        main(json.loads(os.environ["OPENMLX_FOLLOW_ARGV"]))
