"""`tunelab ui`: a local web app to set up, start, watch, compare and try fine-tunes.

Built as server-rendered pages — FastAPI (which `tunelab serve` already uses) and Jinja2 templates — rather than
Gradio: the New-run form is generated from the same pydantic config the CLI validates, so every field, its help
and its error message are the CLI's; each page is plain HTML a test can drive in a real browser; and the UI adds
two small dependencies instead of Gradio's ~100. The only script is one `onchange` that redraws the form when the
task or method changes. Live pages refresh themselves every two seconds while a job runs; the loss chart is the
same matplotlib plot a finished run writes.

- `forms.py`: the config → form → config round trip; `jobs.py`: background jobs (separate processes) and the
  run folders, read defensively; `app.py`: the routes; `door.py`: what is checked before a route runs (Host,
  cross-site requests, the form token, the key); `templates/`: the pages.
- Safety: binds 127.0.0.1 by default; another host needs `--api-key-file` (or TUNELAB_API_KEY); it answers only
  loopback Host names, its --host address and `--allow-host` names (DNS rebinding); a request that starts, stops
  or writes must come from its own pages (Origin / Sec-Fetch-Site) and carry the process's form token; uploads are
  size-limited and stored under RUNS/.ui/uploads; a path from the browser is used only if it resolves inside the
  working directory or the runs folder.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import TunelabError


def ui(host: str = "127.0.0.1", port: int = 7860, runs_dir: str = "runs", api_key: str | None = None,
       max_upload_mb: float = 50, allow_hosts: list[str] | None = None) -> None:
    import uvicorn

    from ..serve.guard import HostPolicy, is_loopback
    from .app import create_app

    if not is_loopback(host) and not api_key:
        raise TunelabError(f"--host {host} would open the UI (which starts jobs and reads files) to the network; "
                           f"give it a key with --api-key-file FILE (or TUNELAB_API_KEY), or keep 127.0.0.1")
    app = create_app(Path(runs_dir), api_key=api_key, max_upload_mb=max_upload_mb,
                     hosts=HostPolicy(host, allow_hosts or ()))
    print(f"tunelab ui: http://{host}:{port}/ (runs folder {Path(runs_dir).resolve()}; Ctrl-C stops it — jobs it "
          f"started keep running)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["ui"]
