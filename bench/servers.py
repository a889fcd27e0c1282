"""Start and stop the servers under test, each on a free local port with the same model folder."""
from __future__ import annotations

import os

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.process import ServerProcess  # noqa: E402


@dataclass
class Peer:
    """How to start one server and what its model id is in requests."""

    name: str
    argv: list[str]
    model_id: str
    ready_path: str = "/v1/models"
    env: Optional[dict[str, str]] = None


VENVS = Path(__file__).resolve().parent / ".venvs"
MLX_CPU = "mlx[cpu]" if sys.platform.startswith("linux") else "mlx"
PEER_PACKAGES = {"mlx_lm.server": ["mlx-lm", MLX_CPU], "mlx-knife": ["mlx-knife", MLX_CPU]}


def ensure_venv(name: str, packages: list[str]) -> Path:
    """A venv of its own for a peer (created once under bench/.venvs), so peers' dependencies
    never mix with openmlx's; returns its bin folder."""
    venv = VENVS / name
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    marker = venv / ".installed"
    if marker.is_file() and marker.read_text() == " ".join(packages):
        return bin_dir
    print(f"bench: installing {' '.join(packages)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *packages], check=True)
    marker.write_text(" ".join(packages))
    return bin_dir


def hf_cache_layout(model_dir: Path, root: Path, repo_id: str) -> Path:
    """Expose a model folder as a Hugging Face cache snapshot (mlx-knife only reads that layout);
    returns the HF_HOME to use. Files are symlinked, not copied."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / "0000000000000000000000000000000000000000"
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = snap / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snap.name)
    return root


def peers(model_dir: Path, model_id: str, python: str = sys.executable, work: Path = Path("bench/results"),
          names: tuple[str, ...] = ()) -> dict[str, Peer]:
    """The servers the bench knows (peers only for `names`, installed on demand). Each gets
    `{port}` substituted."""
    table = {
        "openmlx": Peer("openmlx", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                    "--port", "{port}", "--log-level", "warning"], model_dir.name, "/health"),
        "openmlx-nospec": Peer("openmlx-nospec", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                                  "--port", "{port}", "--speculative", "off", "--log-level", "warning"],
                               model_dir.name, "/health"),
        "openmlx-mlxmath": Peer("openmlx-mlxmath", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                                    "--port", "{port}", "--log-level", "warning"],
                                model_dir.name, "/health", env={"OPENMLX_CPU_MATH": "off"}),
        "openmlx-mlxdecode": Peer("openmlx-mlxdecode", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                                        "--port", "{port}", "--log-level", "warning"],
                                  model_dir.name, "/health", env={"OPENMLX_FAST_DECODE": "off"}),
        "openmlx-keep": Peer("openmlx-keep", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                              "--port", "{port}", "--cpu-dtype", "keep", "--log-level", "warning"],
                             model_dir.name, "/health"),
    }
    if "mlx_lm.server" in names:
        bin_dir = ensure_venv("mlx_lm.server", PEER_PACKAGES["mlx_lm.server"])
        table["mlx_lm.server"] = Peer("mlx_lm.server", [str(bin_dir / "python"), "-m", "mlx_lm", "server", "--model",
                                                        str(model_dir), "--port", "{port}", "--log-level", "WARNING"],
                                      str(model_dir))
    for name in ("llama.cpp", "llama.cpp-lookup"):
        if name in names:
            peer = llama_cpp_peer(lookup=name.endswith("lookup"))
            if peer is not None:
                table[name] = peer
    if "mlx-knife" in names:
        bin_dir = ensure_venv("mlx-knife", PEER_PACKAGES["mlx-knife"])
        repo_id = f"mlx-community/{model_dir.name}"
        hf_home = hf_cache_layout(model_dir, work.resolve() / "hf-cache", repo_id)
        table["mlx-knife"] = Peer("mlx-knife", [str(bin_dir / "mlxk"), "serve", "--model", repo_id, "--port", "{port}",
                                                "--log-level", "warning"], repo_id,
                                  env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    return table


# Prebuilt peer wheels: ../shared/peers beside the checkout, or $OPENMLX_PEER_WHEELS.
PEER_WHEELS = Path(os.environ.get("OPENMLX_PEER_WHEELS")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "peers")


def llama_cpp_peer(lookup: bool = False, gguf: Optional[Path] = None, alias: str = "SmolLM2-135M-Instruct-GGUF",
                   n_ctx: int = 4096) -> Optional[Peer]:
    """llama.cpp (llama-cpp-python's server, from the prebuilt wheel in ../shared/peers) on `gguf`,
    by default the GGUF the default model is converted from; None, with a note, where the wheel is
    absent. `lookup`: with its own prompt-lookup drafting (10 tokens), to compare speculation fairly."""
    from engine.config import openmlx_home
    from engine.models.default_model import find_gguf

    wheels = sorted(PEER_WHEELS.glob("llama_cpp_python-*.whl"))
    if not wheels:
        print(f"bench: no llama-cpp-python wheel in {PEER_WHEELS}: llama.cpp skipped", file=sys.stderr)
        return None
    bin_dir = ensure_venv("llama.cpp", [f"{wheels[-1]}[server]"])
    gguf = gguf or find_gguf(openmlx_home(), lambda _m: None)
    draft = ["--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", "10"] if lookup else []
    return Peer("llama.cpp-lookup" if lookup else "llama.cpp",
                [str(bin_dir / "python"), "-m", "llama_cpp.server", "--model", str(gguf), "--port", "{port}",
                 "--n_ctx", str(n_ctx), "--n_threads", "2", "--model_alias", alias, *draft], alias)


class Running(ServerProcess):
    """A peer server started for the bench (the same process helper the tests use)."""

    def __init__(self, peer: Peer, log_dir: Path) -> None:
        self.peer = peer
        super().__init__(peer.argv, log_dir / f"{peer.name}.log", env=peer.env, ready_path=peer.ready_path)

    def wait_ready(self, timeout: float = 300) -> None:
        super().wait_ready(timeout)


def measure_each(table: dict[str, Peer], names: list[str], out: Path, measure: Callable[[Running], dict],
                 label: str) -> dict[str, dict]:
    """Start each named server alone, measure it, stop it: {name: figures}. A peer that can't be had
    here, or fails, is reported as {"error": ...}, not fatal."""
    results: dict[str, dict] = {}
    for name in names:
        if name not in table:  # a peer that can't be had here (noted when it was looked up)
            results[name] = {"error": "not available on this machine"}
            continue
        print(f"{label}: {name}", file=sys.stderr, flush=True)
        run = Running(table[name], out)
        try:
            run.wait_ready()
            results[name] = measure(run)
        except Exception as e:  # a peer that fails is reported, not fatal
            results[name] = {"error": repr(e)}
        finally:
            run.stop()
    return results
