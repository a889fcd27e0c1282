"""`openmlx serve --ranks N`: start, watch and restart the ranks of a distributed model.

Before anything starts, the model's split is checked (engine/distributed/__init__.py `plan_shards`): a
model that can't be split fails here with the reason. On one machine the ranks are started
directly with MLX's ring environment (`MLX_RANK`, `MLX_HOSTFILE` on free 127.0.0.1 ports), which
is what `mlx.launch` does locally, but lets rank 0 outlive a dead worker: it answers 503 and ends
running streams with an error event while the supervisor restarts every rank (a group can't be
rebuilt in-process). With `--hostfile` (other hosts) or `--backend mpi`, `mlx.launch` starts them;
it ends the whole job when a rank fails (and exits 0 even then), so liveness is watched, never
exit codes. Stopping the supervisor stops every rank (each also dies with its parent) and
removes the temporary hostfile.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import EngineConfig

from engine.distributed import launch

log = logging.getLogger("openmlx.supervisor")
GRACE_S = 3.0  # a failed group keeps answering 503 this long before the restart
MAX_RESTARTS = 5  # within RESTART_WINDOW_S; then give up
RESTART_WINDOW_S = 300.0


def _die_with_parent() -> None:
    """Linux: a rank gets SIGKILL when the supervisor dies, so none is left holding a port."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_ports(n: int, first: Optional[int] = None) -> list[int]:
    """`n` ports on 127.0.0.1: from `first` on (each must be free: a busy one is a clear error),
    or any free ones."""
    ports = []
    for i in range(n):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", first + i if first else 0))
            except OSError as e:
                raise SystemExit(f"openmlx: ring port {first + i} is busy ({e.strerror}); choose another "
                                 "--ring-port") from e
            ports.append(s.getsockname()[1])
    return ports


@dataclass(frozen=True)
class RankLaunch:
    """How the ranks are started (serve's --hostfile, --ring-port and --log-level)."""

    hostfile: Optional[Path] = None  # other hosts, through mlx.launch; None: this machine
    ring_port: Optional[int] = None  # the ring's first port; None: free ports
    log_level: str = "info"


def _model_folder(config: EngineConfig) -> Path:
    from engine.models.default_model import ensure_default_model
    from engine.models.resolution import ModelStore, locate

    if config.model is None:
        return ensure_default_model(config.models_dir, config.home)
    return locate(ModelStore(config.models_dir, config.hf_cache, []), config.model).path


class Group:
    """One start of all the ranks."""

    def __init__(self, config: EngineConfig, ranks: RankLaunch, serve_argv: list[str], folder: Path,
                 workdir: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        n = config.world_size
        env = {**os.environ, "OPENMLX_WORLD_SIZE": str(n)}
        follow_argv = ["follow", "--model", str(folder), "--world-size", str(n), "--shard", config.shard,
                       "--backend", config.backend, "--log-level", ranks.log_level,
                       # the same prompt cache on every rank: they keep and drop the same entries
                       "--prompt-cache-bytes", str(config.prompt_cache_bytes),
                       "--kv-group-size", str(config.kv_group_size),
                       *(["--kv-bits", str(config.kv_bits)] if config.kv_bits else [])]
        serve, follow = launch.command(["serve", *serve_argv]), launch.command(follow_argv)
        if ranks.hostfile or config.backend == "mpi":
            self.launcher = True
            script = launch.SCRIPT
            launcher = Path(sys.executable).with_name("mlx.launch")  # installed with mlx, beside python
            cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", config.backend,
                   "--python", sys.executable]
            cmd += ["--hostfile", str(ranks.hostfile)] if ranks.hostfile else ["-n", str(n)]
            env["OPENMLX_SERVE_ARGV"] = json.dumps(serve_argv)
            env["OPENMLX_FOLLOW_ARGV"] = json.dumps(follow_argv)
            self.procs.append(subprocess.Popen([*cmd, str(script)], env=env, start_new_session=True))
            return
        self.launcher = False
        ports = free_ports(n, ranks.ring_port)
        hostfile = workdir / "hostfile.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
        for rank in range(n):
            rank_env = {**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
                        "OPENMLX_RANK_ROLE": "serve" if rank == 0 else "follow"}
            self.procs.append(subprocess.Popen(serve if rank == 0 else follow, env=rank_env,
                                               preexec_fn=_die_with_parent))

    def exited(self) -> Optional[int]:
        """The index of a process that has exited, if any."""
        return next((i for i, p in enumerate(self.procs) if p.poll() is not None), None)

    def tell_rank0_failed(self) -> None:
        if not self.launcher and self.procs[0].poll() is None:
            self.procs[0].send_signal(signal.SIGUSR1)

    def stop(self, graceful: bool, timeout: float = 10.0) -> None:
        """Rank 0 first (SIGTERM: it ends streams and tells the others to stop), then the rest."""
        first = self.procs[0]
        if graceful and first.poll() is None:
            if self.launcher:
                os.killpg(first.pid, signal.SIGTERM)
            else:
                first.send_signal(signal.SIGTERM)
            try:
                first.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + (2.0 if graceful else 0.0)
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                if self.launcher:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
                p.wait()


def supervise(config: EngineConfig, ranks: RankLaunch, serve_argv: list[str]) -> int:
    """Run the ranks until told to stop; restart them all when one dies."""
    from engine.distributed import plan_shards
    from engine.errors import EngineError

    try:
        folder = _model_folder(config)
        plan = plan_shards(folder, config.world_size, config.shard)
    except EngineError as e:
        print(f"openmlx: {e.message}", file=sys.stderr)
        return 2
    log.info("serving %s on %d ranks (%s parallel, %s backend)", folder.name, config.world_size, plan.mode,
             config.backend)
    workdir = Path(tempfile.mkdtemp(prefix="openmlx-ranks-"))
    stopping = {"signal": None}

    def on_signal(sig: int, _frame: object) -> None:
        stopping["signal"] = sig

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    restarts: list[float] = []
    group = Group(config, ranks, serve_argv, folder, workdir)
    started = time.monotonic()
    try:
        while stopping["signal"] is None:
            time.sleep(0.2)
            dead = group.exited()
            if dead is None:
                continue
            status = group.procs[dead].returncode
            if dead == 0 and time.monotonic() - started < 60 and status not in (0, -9, -15) and not restarts:
                log.error("rank 0 failed to start (exit %s)", status)
                return status or 1
            log.error("rank %d exited (status %s): restarting all %d ranks", dead, status, config.world_size)
            group.tell_rank0_failed()
            time.sleep(GRACE_S)  # rank 0 answers 503 meanwhile
            group.stop(graceful=False)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error("ranks failed %d times in %.0f s: giving up", len(restarts), RESTART_WINDOW_S)
                return 1
            group = Group(config, ranks, serve_argv, folder, workdir)
            started = now
        return 0
    finally:
        group.stop(graceful=True)
        shutil.rmtree(workdir, ignore_errors=True)
