"""The routes of `tunelab ui`: server-rendered pages (FastAPI + Jinja2) over the runs folder. Jobs run as separate
processes (jobs.py); the playground loads a finished run with `tunelab.load` — the loader `tunelab serve` uses —
and renders chat prompts with the server's own `render_chat`."""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates

from ..errors import TunelabError
from ..generation import parity_table
from ..plots import read_log
from ..serve.guard import HostPolicy
from . import forms
from .door import TOKEN_FIELD, Door
from .jobs import Jobs, NotAllowed, check_name, list_groups, list_runs, read_json, run_info, run_path
from .playground import Playground, stream_run, try_run

TEMPLATES = Path(__file__).parent / "templates"
SERVED = {".png", ".svg", ".html", ".json", ".jsonl", ".md", ".yaml", ".csv"}


def create_app(runs_dir: str | Path = "runs", api_key: str | None = None, max_upload_mb: float = 50,
               roots: list[Path] | None = None, hosts: HostPolicy | None = None) -> FastAPI:
    """The UI over `runs_dir`. `api_key`: every page needs it; `hosts`: the Host names it answers (default: loopback
    only). A state-changing request must come from its own pages and carry `app.state.csrf_token` (door.py)."""
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # the folders a path typed or sent from the browser may name: the working directory and the runs folder
    allowed = [p.resolve() for p in (roots or [Path.cwd(), root])]
    limit = int(max_upload_mb * 2 ** 20)
    door = Door(api_key, hosts, max_upload_mb)
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(door.form_token)])
    app.state.csrf_token = door.token
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["yaml"] = lambda v: yaml.safe_dump(v, sort_keys=False, allow_unicode=True)
    templates.env.filters["when"] = lambda t: time.strftime("%d %b %H:%M:%S", time.localtime(t)) \
        if isinstance(t, (int, float)) else ""
    templates.env.globals["csrf_field"] = door.field
    jobs, playground = Jobs(root), Playground()
    app.state.jobs = jobs

    def page(request: Request, template: str, status: int = 200, **context):
        return templates.TemplateResponse(request, template, {"root": root, **context}, status_code=status)

    door.install(app, page)

    @app.exception_handler(NotAllowed)
    async def _not_allowed(request: Request, exc: NotAllowed):
        return page(request, "message.html", 403, title="Not allowed", message=str(exc))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a page, never a traceback in the browser
        return page(request, "message.html", 500, title="Something went wrong",
                    message=f"{type(exc).__name__}: {exc}. The server log has the details.")

    # ------------------------------------------------------------------------------------------- runs

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, task: str = "", state: str = "", method: str = "", q: str = ""):
        runs = list_runs(root)
        shown = [r for r in runs if (not task or r.task == task) and (not state or r.state == state)
                 and (not method or r.method == method) and (not q or q.lower() in r.name.lower())]
        live = [j for j in jobs.jobs() if j["alive"]]
        return page(request, "index.html", runs=shown, total=len(runs), groups=list_groups(root),
                    jobs=jobs.jobs()[:10], filters={"task": task, "state": state, "method": method, "q": q},
                    tasks=sorted({r.task for r in runs if r.task}),
                    methods=sorted({r.method for r in runs if r.method}),
                    states=sorted({r.state for r in runs}), refresh=bool(live))

    @app.get("/chart")
    def loss_png(run: str):
        run_id = run
        from ..plots import plot_loss

        path = run_path(root, run_id)
        records, _ = read_log(path / "metrics.jsonl")
        buf = io.BytesIO()
        if not plot_loss(records, buf, title=run_id):
            return Response(status_code=204)
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/file")
    def run_file(run: str, name: str):
        run_id, file = run, name
        path = run_path(root, run_id)
        target = (path / file).resolve()
        if path not in target.parents or target.suffix not in SERVED or not target.is_file():
            raise NotAllowed(f"{file} is not a file of run {run_id} the UI shows")
        return FileResponse(target)

    @app.post("/stop")
    def stop(run: str, back: str = ""):
        jobs.stop(run)
        time.sleep(0.5)
        target = back if re.fullmatch(r"/groups/[A-Za-z0-9._-]+", back) else f"/runs/{run}"
        return RedirectResponse(target, status_code=303)

    @app.post("/resume")
    def resume(run: str):
        run_id = run
        job = jobs.job(check_name(run_id))
        if not job:
            raise NotAllowed(f"{run_id} was not started from this UI; resume it with tunelab train CONFIG --resume")
        jobs.start("train", run_id, Path(job["config"]), resume=True)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse)
    def run_get(request: Request, run_id: str):
        return run_page(request, run_id, None)

    @app.post("/runs/{run_id:path}", response_class=HTMLResponse)
    async def run_try(request: Request, run_id: str):
        """The playground's form: the page again, with the run's answer."""
        from starlette.concurrency import run_in_threadpool

        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        path = run_path(root, run_id)
        tried = await run_in_threadpool(try_run, playground, path, form) if (path / "status.json").exists() else None
        return await run_in_threadpool(run_page, request, run_id, tried)

    @app.post("/try/{run_id:path}")
    async def run_stream(request: Request, run_id: str):
        """The playground's answers as server-sent events, for the run page's script (ui/playground.stream_run)."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        path = run_path(root, run_id)
        if not (path / "status.json").exists():
            raise NotAllowed(f"{run_id}: there is no finished run here")
        events = (f"data: {json.dumps(e)}\n\n" for e in stream_run(playground, path, form))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def run_page(request: Request, run_id: str, tried: dict | None):
        path = run_path(root, run_id)
        job = jobs.job(run_id) if "/" not in run_id else None
        if not (path / "status.json").exists() and not job:
            return page(request, "message.html", 404, title="No such run",
                        message=f"{run_id}: there is no run here (no status.json under {path}).")
        info = run_info(path, full=True) if (path / "status.json").exists() else None
        records, warnings = read_log(path / "metrics.jsonl")
        metrics, problem = read_json(path / "metrics.json")
        progress, _ = read_json(path / "progress.json")
        problems = (info.problems if info else []) + warnings + ([problem] if problem else [])
        alive = bool(job and job["alive"])
        config_text = _read_text(path / "config.yaml") or (_read_text(Path(job["config"])) if job else None)
        samples = _samples(path / "predictions_test.jsonl")
        plots = sorted(p.name for p in path.glob("*.png") if p.name != "loss.png")  # the loss is drawn live
        return page(request, "run.html", run_id=run_id, info=info, job=job, alive=alive, metrics=metrics,
                    engines=parity_table(path),
                    progress=progress, problems=problems, log=jobs.log_tail(run_id) if job else "",
                    has_loss=any("loss" in r or "eval_loss" in r for r in records), config_text=config_text,
                    samples=samples, plots=plots, tried=tried, refresh=alive, now=int(time.time()),
                    kind=_kind(config_text))

    # ------------------------------------------------------------------------------------------- compare

    @app.get("/compare", response_class=HTMLResponse)
    def compare_runs(request: Request):
        ids = request.query_params.getlist("run")
        infos, metrics = [], []
        for run_id in ids:
            path = run_path(root, run_id)
            info = run_info(path, full=True)
            info.name = run_id
            infos.append(info)
            metrics.append(read_json(path / "metrics.json")[0] or {})
        keys = []
        for m in metrics:
            for k, v in (m.get("test") or {}).items():
                if isinstance(v, (int, float)) and k not in keys:
                    keys.append(k)
        return page(request, "compare.html", infos=infos, metrics=metrics, keys=keys)

    @app.get("/groups/{name}", response_class=HTMLResponse)
    def group(request: Request, name: str):
        check_name(name)
        job = jobs.job(name.split("-", 1)[1]) if "-" in name else None
        return page(request, "group.html", name=name, report=(root / name / "report.html").exists(),
                    runs=[r for r in list_runs(root) if r.name.startswith(name + "/")], job=job,
                    log=jobs.log_tail(job["name"]) if job else "", refresh=bool(job and job["alive"]))

    @app.get("/groups/{name}/report.html")
    def group_report(name: str):
        path = root / check_name(name) / "report.html"
        if not path.is_file():
            raise NotAllowed(f"{name} has no report yet")
        return FileResponse(path)

    @app.get("/groups/{name}/{file}")
    def group_file(name: str, file: str):
        path = (root / check_name(name) / file).resolve()
        if (root / name).resolve() not in path.parents or path.suffix not in SERVED or not path.is_file():
            raise NotAllowed(f"{file} is not a file of {name} the UI shows")
        return FileResponse(path)

    # ------------------------------------------------------------------------------------------- new run

    def new_page(request: Request, form: dict, result: dict | None = None, status: int = 200):
        from ..tasks import TASKS

        task = form.get("task") or "classify"
        if task not in TASKS:
            task = "classify"
        methods = forms.methods_for(task)
        method = form.get("method") or (TASKS[task].DEFAULT_METHOD or "lora")
        if method not in methods:
            method = methods[0] if "lora" not in methods else "lora"
        secs = forms.sections(task, method)
        forms.fill(secs, form)
        result = result or {}
        other = forms.attach_errors(secs, result.get("problems", [])) if result.get("problems") else []
        from ..data.readers import SAMPLES

        samples = sorted(f"sample:{p.stem}" for p in SAMPLES.glob("*.jsonl"))
        return page(request, "new.html", status, task=task, method=method, tasks=list(TASKS), methods=methods,
                    sections=secs, name=form.get("name", ""), other_problems=other, result=result,
                    samples=samples, max_upload_mb=max_upload_mb)

    @app.get("/new", response_class=HTMLResponse)
    def new_get(request: Request):
        return new_page(request, dict(request.query_params))

    @app.post("/new", response_class=HTMLResponse)
    async def new_post(request: Request):
        raw_form = await request.form()
        form = {k: v for k, v in raw_form.items() if isinstance(v, str)}
        upload = raw_form.get("upload")
        action = form.get("action", "validate")
        if action == "redraw":  # posted, so the form token never lands in a URL; then the GET page of those fields
            kept = {k: v for k, v in form.items() if k not in (TOKEN_FIELD, "action")}
            return RedirectResponse("/new?" + urlencode(kept), status_code=303)
        result: dict = {"action": action}
        name = form.get("name", "").strip()
        if action in ("train", "compare", "search", "validate", "check", "preview") and not name:
            name = "ui-" + time.strftime("%Y%m%d-%H%M%S")
            form["name"] = name
        try:
            check_name(name)
        except NotAllowed as exc:
            result["problems"] = [f"name: {exc}"]
            return new_page(request, form, result, 400)
        if upload is not None and getattr(upload, "filename", ""):
            saved = await _save_upload(upload, jobs.uploads, limit)
            if isinstance(saved, str):
                result["problems"] = [f"data.train: {saved}"]
                return new_page(request, form, result, 400)
            form[forms.PREFIX + "data.train"] = str(saved)
        problems = _check_paths(form, allowed)
        task = form.get("task") or "classify"
        method = form.get("method") or "lora"
        secs = forms.sections(task, method)
        raw, yaml_problems = forms.raw_config(task, method, secs, form)
        if action == "train":
            raw.setdefault("output", {}).setdefault("dir", str(jobs.out_dir("train", name)))
        config_path = jobs.configs / f"{name}.yaml"
        config, load_problems = forms.validate(raw, config_path)
        problems += yaml_problems + load_problems
        result["yaml"] = config_path.read_text() if config_path.exists() else ""
        result["config_file"] = name
        if problems:
            result["problems"] = problems
            return new_page(request, form, result, 400)
        if action in ("check", "preview"):
            from starlette.concurrency import run_in_threadpool

            result["report"] = await run_in_threadpool(_data_report, config, action)
            return new_page(request, form, result)
        if action in ("train", "compare", "search"):
            if action == "train":
                from ..runs import check_output

                try:
                    check_output(Path(config.output.dir), config, resume=False, overwrite=False)
                except TunelabError as exc:
                    result["problems"] = [f"name: {exc}"]
                    return new_page(request, form, result, 400)
            jobs.start(action, name, config_path)
            target = f"/runs/{name}" if action == "train" else f"/groups/{action}-{name}"
            return RedirectResponse(target, status_code=303)
        result["valid"] = True
        return new_page(request, form, result)

    @app.get("/configs/{name}.yaml")
    def config_yaml(name: str):
        path = jobs.configs / f"{check_name(name)}.yaml"
        if not path.is_file():
            raise NotAllowed(f"no config called {name}")
        return PlainTextResponse(path.read_text(), media_type="application/yaml",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.yaml"'})

    return app


def _kind(config_text: str | None) -> str:
    """"classifier" or "generator": what the playground shows, from the run's task."""
    from ..tasks import TASKS

    try:
        task = (yaml.safe_load(config_text or "") or {}).get("task", "classify")
    except yaml.YAMLError:
        return "unknown"
    t = TASKS.get(task)
    return "generator" if t is not None and t.SERVES == "generate" else ("classifier" if t is not None and
                                                                        t.SERVES == "classify" else "other")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _samples(path: Path, n: int = 5) -> list[dict]:
    import json

    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
                if len(out) >= n:
                    break
    except OSError:
        pass
    return out


def _check_paths(form: dict, allowed: list[Path]) -> list[str]:
    """Data paths typed in the form must resolve inside the allowed folders (samples and hub: ids pass)."""
    problems = []
    for key in ("data.train", "data.validation", "data.test", "eval.forgetting"):
        value = form.get(forms.PREFIX + key, "").strip()
        if not value or value.startswith(("sample:", "hub:")):
            continue
        try:
            from .jobs import inside

            inside(Path(value), allowed)
        except NotAllowed as exc:
            problems.append(f"{key}: {exc}")
    return problems


async def _save_upload(upload, folder: Path, limit: int) -> Path | str:
    """The uploaded file stored under `folder` (size-limited, a safe name); or what is wrong with it."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(upload.filename).name)[:80] or "upload"
    if Path(name).suffix not in {".jsonl", ".json", ".csv", ".tsv", ".parquet"}:
        return f"{upload.filename}: upload a .jsonl, .json, .csv, .tsv or .parquet file"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    tmp = target.with_name(target.name + ".partial")
    size = 0
    with open(tmp, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                out.close()
                tmp.unlink()
                return f"{upload.filename} is larger than the upload limit ({limit / 2**20:g} MB)"
            out.write(chunk)
    tmp.replace(target)
    return target


def _data_report(config, action: str) -> str:
    """`tunelab data check` (or `data preview` of the first training example) as text."""
    from ..data.check import check, format_report

    try:
        if action == "check":
            return format_report(check(config), "data")
        from transformers import AutoTokenizer

        from ..models import resolve
        from ..tasks import TASKS

        task = TASKS[config.task]
        if not hasattr(task, "preview"):
            return f"data preview renders examples of task sft; this is task {config.task}"
        frame = task.load_splits(config).train
        tokenizer = AutoTokenizer.from_pretrained(resolve(config.model.name))
        return "train example 0; trained tokens between ⟦ ⟧\n" + task.preview(
            frame["_conv"].iloc[0], tokenizer, config.data, config.model.max_length, color=False)
    except TunelabError as exc:
        return f"error: {exc}"
