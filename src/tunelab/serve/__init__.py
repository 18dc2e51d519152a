"""`tunelab serve RUN [RUN ...]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for finished runs.

- `api.py`: the routes (`/v1/models`, `/v1/completions`, `/v1/chat/completions` with streaming, `/v1/classify`,
  `/health`), request checks and errors in OpenAI's shape; `limits.py`: every limit, in one place.
- `registry.py`: the runs loaded by their tasks; adapter runs over one base share **one** copy of it.
- generation runs in continuous batching (`tunelab/generation/continuous.py`, one step loop per model): a request
  joins the running batch at the next token and leaves it the step it finishes; a client that goes away cancels it.
  A single adapter is served merged into its base; several adapters on one base mix in one batch (peft's
  `adapter_names`).
- `batching.py`: the jobs (incremental detokenization, stop strings) and the static-batch worker — classify
  batches taken round-robin across requests within a token budget, and generation where the loop does not fit
  (prompt-learning adapters) or `--static-batches` asks for it.
- `guard.py`: the Host allowlist (against DNS rebinding), the cross-site check and the key comparison, shared with
  `tunelab ui`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import TunelabError
from .api import API_KEY_ENV, ClientError, create_app
from .guard import HostPolicy, is_loopback
from .limits import Limits
from .registry import Registry

__all__ = ["API_KEY_ENV", "ClientError", "Limits", "Registry", "create_app", "is_loopback", "read_api_key", "serve",
           "wait_until_healthy"]


def read_api_key(api_key: str | None = None, key_file: str | None = None) -> str | None:
    """The API key: --api-key-file (first line), else TUNELAB_API_KEY, else --api-key (visible in the process list)."""
    if key_file:
        path = Path(key_file)
        try:
            key = path.read_text(encoding="utf-8").strip().split("\n")[0].strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TunelabError(f"--api-key-file {key_file}: cannot be read ({exc})") from None
        if not key:
            raise TunelabError(f"--api-key-file {key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or api_key or None


def serve(runs: list, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, log_level: str = "info", allow_public: bool = False,
          allow_hosts: list[str] | None = None) -> None:
    """Load `runs` and serve them until interrupted (blocking). A host other than loopback needs an API key
    (or `allow_public`). Requests are answered only for loopback names, `host` itself and `allow_hosts`."""
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not key and not allow_public:
        raise TunelabError(f"--host {host} makes the server reachable from other machines, and no API key is set: "
                           f"anyone there could use it. Set a key (TUNELAB_API_KEY or --api-key-file), or pass "
                           f"--allow-public if that is what you want")
    limits = limits or Limits()
    registry = Registry(runs, limits)
    print("tunelab serve:")
    for line in registry.lines:
        print(f"  {line}")
    app = create_app(runs, limits, key, registry=registry, hosts=HostPolicy(host, allow_hosts or ()))
    print(f"  OpenAI-compatible API at http://{host}:{port}/v1" + (" (API key required)" if key else ""))
    if not is_loopback(host) and not key:
        print(f"  warning: no API key and --host {host}: open to every machine that reaches this one")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def wait_until_healthy(proc, port: int, timeout: float) -> str:
    """Poll a `tunelab serve` process's /health on 127.0.0.1:PORT: "ready", "exited" or "timeout" (then killed).
    For scripts and tests that start the server as a subprocess."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    return "timeout"
