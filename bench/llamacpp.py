"""Generation speed of an exported GGUF in llama.cpp next to `tunelab generate`, on the same prompts, in one
invocation: llama.cpp is the CPU anchor for what generation speed is possible on this machine.

The run: a short LoRA SFT of SmolLM2-135M-Instruct on the shipped EN→FR data (or --run RUN), exported with
`tunelab export --format gguf` at f16, q8_0 and q4_k_m (each parity-checked by the export). The prompts: the run's
test prompts rendered as training did. Each side generates greedily up to 64 new tokens per prompt, stopping at
EOS, with the same number of threads; generated tokens are counted with each side's own tokenizer output.
tunelab is measured one request at a time (latency, what a chat user sees) and in its default batches of 16
(throughput); llama.cpp (llama-cpp-python, one sequence) one request at a time.

    python bench/llamacpp.py [--prompts 32] [--run RUN]          → bench/results/llamacpp.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, WORK, table, write  # noqa: E402

QUANTS = ("f16", "q8_0", "q4_k_m")


def _run() -> Path:
    import yaml

    import tunelab

    out = WORK / "gguf" / "run"
    if (out / "status.json").exists() and '"completed"' in (out / "status.json").read_text():
        return out
    cfg = {"model": {"name": "smollm2-135m", "max_length": 256}, "task": "sft",
           "data": {"train": "sample:translate_en_fr", "prompt": "en", "response": "fr",
                    "instruction": "Translate this English user-interface text into French.",
                    "split": {"validation": 0.1, "test": 0.2, "seed": 42}},
           "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 30, "batch_size": 4, "packing": True, "lr": 5e-4},
           "eval": {"forgetting": None, "max_generate": 16}, "output": {"dir": str(out)}}
    path = WORK / "gguf" / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return tunelab.train(path, overwrite=out.exists()).path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--run", help="a finished generative run (default: train the short one above)")
    args = ap.parse_args()
    import llama_cpp
    import torch

    import tunelab
    from tunelab.gguf import held_out_conversations
    from tunelab.runs import open_finished
    from tunelab.tasks import TASKS

    run = Path(args.run) if args.run else _run()
    path, config = open_finished(run)
    task = TASKS[config.task]
    files = {}
    for quant in QUANTS:
        info = tunelab.export(path, "gguf", quant=quant)
        files[quant] = {"file": Path(info["path"]) / info["file"], "identical": info["identical"],
                        "perplexity_ratio": info["perplexity_ratio"], "mb": round(info["bytes"] / 2**20, 1)}
    generator = task.load(path, config)
    generator.model = generator.model.merge_and_unload().eval()
    prompts = [generator.render_conversation(c) for c in held_out_conversations(path, config, task, args.prompts)]
    max_new = 64
    threads = torch.get_num_threads()

    def tokens(texts):
        return sum(len(generator.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)

    results = {}
    for name, batch in (("tunelab, one request at a time", 1), ("tunelab, batches of 16", 16)):
        generator.generate(prompts[:2], max_new_tokens=8, batch_size=batch)  # warm-up
        t0 = time.perf_counter()
        out = generator.generate(prompts, max_new_tokens=max_new, batch_size=batch)
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens(out) / seconds, 1)}
    for quant, f in files.items():
        llm = llama_cpp.Llama(model_path=str(f["file"]), n_ctx=config.model.max_length + max_new + 16,
                              n_threads=threads, verbose=False)
        llm.create_completion(prompts[0], max_tokens=8, temperature=0.0)  # warm-up
        t0, generated = time.perf_counter(), 0
        for p in prompts:
            out = llm.create_completion(p, max_tokens=max_new, temperature=0.0, top_k=1, repeat_penalty=1.0)
            generated += out["usage"]["completion_tokens"]
        seconds = time.perf_counter() - t0
        results[f"llama.cpp {quant}, one request at a time"] = {
            "seconds": round(seconds, 2), "tokens_per_s": round(generated / seconds, 1), "file_mb": f["mb"],
            "parity_identical": f["identical"], "perplexity_ratio": round(f["perplexity_ratio"], 4)}
    base = results["tunelab, one request at a time"]["tokens_per_s"]
    for r in results.values():
        r["vs_tunelab_single"] = round(r["tokens_per_s"] / base, 2)
    print(table([[k, v["tokens_per_s"], v["vs_tunelab_single"], v.get("file_mb", ""),
                  f"{v['parity_identical']:.0%}" if "parity_identical" in v else ""] for k, v in results.items()],
                ["", "tokens/s", "× tunelab (1 at a time)", "file MB", "parity"]))
    write("llamacpp", {"run": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                       "prompts": len(prompts), "max_new_tokens": max_new, "threads": threads,
                       "llama_cpp_python": llama_cpp.__version__, "results": results})


if __name__ == "__main__":
    main()
