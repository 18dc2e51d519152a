"""The child process of the vllm engine (generation/vllm.py), run by the Python of an environment that has vLLM —
vLLM pins its own transformers and torch, so it lives in an environment of its own, and this file imports nothing
but vLLM and the standard library. It loads one model folder and runs vLLM's engine step loop (continuous
batching: `LLMEngine.add_request`, `step`, `abort_request`), driven by JSON lines on stdin and answering with
JSON lines on stdout after MARK (vLLM logs to the same streams):

    in:  {"add": ID, "ids": [...], "max_tokens", "temperature", "top_p", "ignore_eos", "stop_ids", "prompt_logprobs"}
         {"abort": ID}
         {"batch": ID, "requests": [{...as add}]}   offline: run together by LLM.generate, answered at once
    out: {"ready": true, "vllm": VERSION}
         {"batch": ID, "outputs": [{"ids": [all token ids], "finish", "prompt"}]}
         {"out": [{"id": ID, "ids": [new token ids], "finish": null | "stop" | "length" | ...,
                   "prompt": [[top_id, top_logprob, logprob_of_the_next_id], ...] (once, when asked)}]}
         {"error": "...", "id": ID | null}

    python vllm_worker.py '{"model": DIR, "dtype": "float32", "max_model_len": N, "seed": 0}'
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading

MARK = "TUNELAB-VLLM "
# run as a script, its folder comes first on the path, and tunelab's generation/vllm.py would shadow vLLM
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def _say(payload: dict) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _prompt_logprobs(ids: list[int], scored) -> list | None:
    """Per position after the first: vLLM's most likely token there, its logprob, and the logprob of the actual
    next token (vLLM returns both when asked for one prompt logprob)."""
    if scored is None:
        return None
    out = []
    for i, entry in enumerate(scored[1:], start=1):
        top = min(entry.items(), key=lambda kv: kv[1].rank)
        out.append([top[0], top[1].logprob, entry[ids[i]].logprob])
    return out


def _params(sampling_params, r: dict, settings: dict):
    return sampling_params(max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                           ignore_eos=r["ignore_eos"], stop_token_ids=r["stop_ids"] or None,
                           prompt_logprobs=r.get("prompt_logprobs"), seed=settings.get("seed", 0),
                           skip_special_tokens=True)


def main() -> int:
    settings = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # no spawned engine process: one child, one model
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("kv_cache_gb", 1)))
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=settings["model"], dtype=settings["dtype"], max_model_len=settings["max_model_len"],
              seed=settings.get("seed", 0), enable_prefix_caching=False)
    engine = llm.llm_engine
    commands: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                commands.put(json.loads(line))
        commands.put(None)  # the parent closed stdin: finish

    threading.Thread(target=read, daemon=True).start()
    _say({"ready": True, "vllm": vllm.__version__})
    sent: dict[str, int] = {}  # request id -> tokens already sent
    asked: dict[str, list] = {}  # request id -> prompt ids, while its prompt logprobs are still to send
    while True:
        busy = engine.has_unfinished_requests()
        try:
            command = commands.get(block=not busy)
            while True:
                if command is None:
                    return 0
                rid = command.get("add") or command.get("abort") or command.get("batch")
                try:
                    if "batch" in command:  # offline: the whole batch through LLM.generate, one answer line
                        done = llm.generate([{"prompt_token_ids": r["ids"]} for r in command["requests"]],
                                            [_params(SamplingParams, r, settings) for r in command["requests"]],
                                            use_tqdm=False)
                        _say({"batch": rid, "outputs": [
                            {"ids": list(d.outputs[0].token_ids), "finish": d.outputs[0].finish_reason,
                             "prompt": _prompt_logprobs(r["ids"], d.prompt_logprobs) if r.get("prompt_logprobs")
                             else None} for r, d in zip(command["requests"], done)]})
                    elif "abort" in command:
                        engine.abort_request([rid])
                        sent.pop(rid, None)
                        asked.pop(rid, None)
                    else:
                        engine.add_request(rid, {"prompt_token_ids": command["ids"]},
                                           _params(SamplingParams, command, settings))
                        sent[rid] = 0
                        if command.get("prompt_logprobs"):
                            asked[rid] = command["ids"]
                except Exception as exc:  # noqa: BLE001 — said to the parent, which fails that request
                    _say({"error": f"{type(exc).__name__}: {exc}", "id": rid})
                command = commands.get_nowait()
        except queue.Empty:
            pass
        if not engine.has_unfinished_requests():
            continue
        try:
            outputs = engine.step()
        except Exception as exc:  # noqa: BLE001 — every running request fails; the parent says why
            _say({"error": f"{type(exc).__name__}: {exc}", "id": None})
            return 1
        batch = []
        for o in outputs:
            if o.request_id not in sent:
                continue
            ids = list(o.outputs[0].token_ids)
            item = {"id": o.request_id, "ids": ids[sent[o.request_id]:],
                    "finish": o.outputs[0].finish_reason if o.finished else None}
            sent[o.request_id] = len(ids)
            if o.request_id in asked:
                item["prompt"] = _prompt_logprobs(asked.pop(o.request_id), o.prompt_logprobs)
            if o.finished:
                sent.pop(o.request_id)
            batch.append(item)
        if batch:
            _say({"out": batch})


if __name__ == "__main__":
    sys.exit(main())
