"""`tunelab export RUN --format gguf [--quant f16|bf16|q8_0|q4_k_m]`: a generative run as one GGUF file for
llama.cpp and Ollama, with the prompt format it was trained with inside, an Ollama Modelfile beside it, and a
parity check against tunelab's own generations.

Nothing here converts weights by hand. llama.cpp's own converter (`convert_hf_to_gguf.py` with its `conversion`
package and `gguf-py`) is taken from the llama-cpp-python source distribution on PyPI — the same release the
`[gguf]` extra installs as the runtime — and kept in the tunelab cache; `q4_k_m` is quantized from the f16 file by
llama.cpp's quantizer (`llama_model_quantize` through llama-cpp-python).

What the GGUF's chat template says is what training rendered: a run that used the model's own chat template keeps
it; any other prompt format (alpaca, a fixed instruction, plain) becomes a template that renders the last user
message exactly as `tunelab generate --prompt` does. The Modelfile's Go TEMPLATE is derived from the same
rendering and checked against it before it is written.

Parity (export-gguf/parity.json, written in every case): the run's test prompts, rendered by the GGUF's own
chat template (llama-cpp-python's Jinja formatter reading the file's metadata), generated greedily by llama.cpp,
against tunelab's greedy generations of the merged model from the prompts training rendered. For f16/bf16 at
least 95% must be identical, else the export is refused (exit 2) — a wrong template or stop token shows up here.
Quantized files report their agreement and the perplexity ratio on the test responses.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import RunError, TunelabError

LLAMA_CPP_PYTHON = "0.3.36"  # the [gguf] extra pins the same release
QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPE = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0"}  # q4_k_m: quantized from f16 by llama.cpp
AGREEMENT = 0.95  # identical greedy continuations needed from a 16-bit file
_SLOT = "\x00TUNELAB-{}\x00"


# ------------------------------------------------------------------------------------------- the converter

def converter_dir() -> Path:
    """llama.cpp's converter, extracted once from the llama-cpp-python sdist into the tunelab cache."""
    from .models.registry import cache_dir

    folder = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (folder / "convert_hf_to_gguf.py").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            raise TunelabError(f"llama.cpp's converter comes from the llama-cpp-python=={LLAMA_CPP_PYTHON} source "
                               f"distribution on PyPI, which could not be downloaded (offline?): "
                               f"{(got.stderr or got.stdout).strip().splitlines()[-1:]}")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and rel.startswith(wanted) and (member.isfile() or member.isdir()):
                    member.name = rel
                    tar.extract(member, staging, filter="data")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(folder)
        except OSError:  # another process extracted it meanwhile
            if not (folder / "convert_hf_to_gguf.py").exists():
                raise
    return folder


def convert(hf_folder: Path, out_file: Path, outtype: str) -> None:
    """`convert_hf_to_gguf.py HF_FOLDER --outfile OUT --outtype TYPE`, in its own process."""
    tool = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tool), str(tool / "gguf-py")])}
    done = subprocess.run([sys.executable, str(tool / "convert_hf_to_gguf.py"), str(hf_folder), "--outfile",
                           str(out_file), "--outtype", outtype], capture_output=True, text=True, env=env)
    if done.returncode or not out_file.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise TunelabError(f"llama.cpp's converter failed on {hf_folder}:\n{tail}")


def quantize(f16_file: Path, out_file: Path, quant: str) -> None:
    llama_cpp = _runtime()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), params) != 0:
        raise TunelabError(f"llama.cpp could not quantize {f16_file.name} to {quant}")


def _runtime():
    try:
        import llama_cpp
    except ImportError as e:
        raise TunelabError("the GGUF parity check and q4_k_m need llama.cpp's runtime: pip install 'tunelab[gguf]' "
                           "(llama-cpp-python, built from source where PyPI has no wheel: minutes)") from e
    return llama_cpp


# ------------------------------------------------------------------------------------------ prompt formats

def prompt_template(generator) -> dict:
    """How the exported model must render a conversation so it sees what training showed it.

    {"kind": "model" | "single_turn", "jinja": str | None (None: keep the tokenizer's own), "prefix", "suffix"
    (single-turn: the text around the user message), "chat": the Ollama pieces (model templates)}."""
    fmt = generator.prompt_format()
    data = generator.config.data
    if fmt == "chat" and not data.instruction:
        try:
            pieces = chat_pieces(generator.tokenizer)
        except ValueError:
            pieces = None
        if pieces is not None and not _pieces_reproduce(pieces, generator.tokenizer):
            pieces = None  # the template does more than wrap each message: Ollama reads the GGUF's own instead
        return {"kind": "model", "jinja": None, "pieces": pieces}
    try:
        rendered = generator.render(_SLOT.format("USER"))
    except TunelabError as e:
        raise RunError(f"GGUF export needs a prompt a chat client can fill: {e}") from None
    prefix, _, suffix = rendered.partition(_SLOT.format("USER"))
    jinja = "{{ " + _literal(prefix) + " }}{{ messages[-1]['content'] }}{{ " + _literal(suffix) + " }}"
    return {"kind": "single_turn", "jinja": jinja, "prefix": prefix, "suffix": suffix}


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a valid Jinja string literal (escapes as in Python)


def chat_pieces(tokenizer) -> dict:
    """The fixed text a chat template puts around each role's content, read off renderings with placeholder
    contents; checked by rendering conversations with the pieces (`render_pieces`) and comparing."""
    s, u1, a1, u2 = (_SLOT.format(n) for n in ("S", "U1", "A1", "U2"))

    def render(messages, gen=True):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    def cut(text, *slots):
        out, rest = [], text
        for slot in slots:
            head, found, rest = rest.partition(slot)
            if not found:
                raise ValueError(slot)
            out.append(head)
        return out + [rest]

    user, assistant, system = ({"role": r, "content": c} for r, c in (("user", u1), ("assistant", a1),
                                                                       ("system", s)))
    c0, c1, c2, c3 = cut(render([user, assistant, {"role": "user", "content": u2}]), u1, a1, u2)
    _, g1 = cut(render([user], gen=False), u1)
    _, _, d2 = cut(render([user, assistant], gen=False), u1, a1)
    b0, b1, _ = cut(render([system, user]), s, u1)
    pieces = {"user_post": g1, "assistant_post": d2, "generation": c3[len(g1):],
              "assistant_pre": c1[len(g1):], "user_pre": c2[len(d2):], "system_pre": b0}
    pieces["no_system"] = c0[:len(c0) - len(pieces["user_pre"])]
    pieces["system_post"] = b1[:len(b1) - len(pieces["user_pre"])]
    return pieces


def _pieces_reproduce(pieces: dict, tokenizer) -> bool:
    """Whether the pieces render conversations (with and without a system prompt, one and two user turns) exactly
    as the tokenizer's chat template does."""
    talk = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "  Name a colour.\nJust one.\n"}]
    cases = [talk[:1], talk, [{"role": "system", "content": "Answer briefly."}] + talk]
    return all(render_pieces(pieces, m) == tokenizer.apply_chat_template(m, add_generation_prompt=True,
                                                                          tokenize=False) for m in cases)


def render_pieces(pieces: dict, messages: list[dict]) -> str:
    """What the Modelfile's TEMPLATE renders for `messages` (the same logic, in Python)."""
    out = ""
    if messages and messages[0]["role"] == "system":
        out += pieces["system_pre"] + messages[0]["content"] + pieces["system_post"]
        messages = messages[1:]
    else:
        out += pieces["no_system"]
    for m in messages:
        out += pieces[f"{m['role']}_pre"] + m["content"] + pieces[f"{m['role']}_post"]
    return out + pieces["generation"]


def _go(text: str) -> str:
    """Literal text inside an Ollama (Go) template."""
    if '"""' in text:
        raise RunError('the prompt format contains """, which an Ollama Modelfile cannot quote')
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, template: dict, tokenizer) -> str:
    lines = ["# written by tunelab: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template["kind"] == "single_turn":
        body = _go(template["prefix"]) + "{{ .Prompt }}" + _go(template["suffix"])
    elif template["pieces"] is None:
        lines.append("# no TEMPLATE: the chat template is more than fixed text around each message, so Ollama "
                     "reads the one inside the GGUF")
        body = None
    else:
        p = {k: _go(v) for k, v in template["pieces"].items()}
        # no {{- trimming: the pieces' own newlines are part of the format
        body = ("{{ if .System }}" + p["system_pre"] + "{{ .System }}" + p["system_post"] + "{{ else }}"
                + p["no_system"] + "{{ end }}{{ range .Messages }}"
                + '{{ if eq .Role "user" }}' + p["user_pre"] + "{{ .Content }}" + p["user_post"]
                + '{{ else if eq .Role "assistant" }}' + p["assistant_pre"] + "{{ .Content }}"
                + p["assistant_post"] + "{{ end }}{{ end }}" + p["generation"])
    if body is not None:
        lines.append(f'TEMPLATE """{body}"""')
    for stop in stop_tokens(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def stop_tokens(tokenizer) -> list[str]:
    """The token training appended after every response (the tokenizer's EOS), which generation must stop at."""
    return [tokenizer.eos_token] if tokenizer.eos_token else []


# ------------------------------------------------------------------------------------------------- export

def export_gguf(path: Path, config, target: Path, quant: str, prompts: int = 32) -> dict:
    """Write TARGET/model-QUANT.gguf, TARGET/Modelfile and TARGET/parity.json (other quants already in TARGET are
    kept); refuse a 16-bit file that fails the parity check."""
    import torch

    from .folders import MARKER, write_output_dir
    from .methods import trait, with_trait
    from .tasks import TASKS
    from .tasks import with_trait as tasks_with_trait

    if quant not in QUANTS:
        raise TunelabError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    task, method = TASKS[config.task], config.method.name
    if not task.CAUSAL_LM:
        raise RunError(f"{path} is a `{config.task}` run; GGUF export handles decoder-only generative runs "
                       f"({', '.join(tasks_with_trait('CAUSAL_LM'))})")
    if not (trait(method, "MERGEABLE") or trait(method, "FULL_MODEL")):
        raise RunError(f"{path} is a `{method}` run, which llama.cpp cannot hold (its trained part is not a weight "
                       f"of the model); GGUF export takes {', '.join(with_trait('MERGEABLE'))} runs (merged first) "
                       f"and full-model runs")
    generator = task.load(path, config, full_precision=True)
    if trait(method, "MERGEABLE"):
        generator.model = generator.model.merge_and_unload().eval()
    generator.model = generator.model.float().cpu().eval()
    template = prompt_template(generator)
    convs = held_out_conversations(path, config, task, prompts)
    name = f"model-{quant}.gguf"
    info: dict = {}

    def fill(tmp: Path) -> None:
        old = target if (target / MARKER).exists() else None
        if old is not None:  # earlier quantizations stay: their GGUFs hard-linked (no copy of the weights), the
            for f in old.iterdir():  # small files copied — they are rewritten here and must not change in place
                if f.is_file() and f.name != name:
                    (os.link if f.suffix == ".gguf" else shutil.copy2)(f, tmp / f.name)
        hf = tmp / ".hf"
        generator.model.save_pretrained(hf)
        tokenizer = generator.tokenizer
        saved_template = tokenizer.chat_template
        if template["jinja"] is not None:
            tokenizer.chat_template = template["jinja"]
        try:
            tokenizer.save_pretrained(hf)
        finally:
            tokenizer.chat_template = saved_template
        if quant in CONVERTER_OUTTYPE:
            convert(hf, tmp / name, CONVERTER_OUTTYPE[quant])
        else:
            convert(hf, tmp / ".f16.gguf", "f16")
            quantize(tmp / ".f16.gguf", tmp / name, quant)
            (tmp / ".f16.gguf").unlink()
        shutil.rmtree(hf)
        result = parity(tmp / name, generator, convs, template, config)
        result.update({"quant": quant, "file": name, "bytes": (tmp / name).stat().st_size})
        record = json.loads((tmp / "parity.json").read_text()) if (tmp / "parity.json").exists() else {}
        record[quant] = result
        (tmp / "parity.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
        if quant in ("f16", "bf16") and result["identical"] < AGREEMENT:
            _keep_failed_parity(target, record, MARKER)
            raise TunelabError(
                f"the {quant} GGUF answers differently from the trained model: identical greedy continuations on "
                f"{result['identical']:.0%} of {result['prompts']} test prompts (needed {AGREEMENT:.0%}; prompts "
                f"rendered identically by the GGUF's chat template: {result['prompts_identical']:.0%}); nothing "
                f"was written but {target / 'parity.json'}")
        (tmp / "Modelfile").write_text(modelfile(name, template, generator.tokenizer))
        quants = sorted(f.stem.removeprefix("model-") for f in tmp.glob("model-*.gguf"))
        (tmp / MARKER).write_text(json.dumps({"format": "gguf", "run": str(path), "quants": quants}, indent=2))
        info.update(result)

    with torch.inference_mode():
        written = write_output_dir(target, fill, "export", run=path)
    return {"format": "gguf", **info, "path": str(written), "modelfile": str(written / "Modelfile")}


def _keep_failed_parity(target: Path, record: dict, marker: str) -> None:
    """A refused export still leaves its evidence: TARGET/parity.json (the folder holds no GGUF of that quant, so
    it cannot pass for a finished export). Written atomically; a new TARGET gets the export marker."""
    from .runs import write_json

    target.mkdir(parents=True, exist_ok=True)
    if not (target / marker).exists():
        write_json(target / marker, {"format": "gguf", "quants": []})
    write_json(target / "parity.json", record)


def held_out_conversations(path: Path, config, task, n: int) -> list:
    """Up to `n` of the run's test conversations (the split training held out), in order."""
    splits = task.load_splits(config)
    frame = splits.test if len(splits.test) else splits.validation
    if not len(frame) or "_conv" not in frame:
        raise RunError(f"{path} has no test or validation conversations to check the GGUF against")
    return list(frame["_conv"])[:n]


def user_message(conv, template: dict, data) -> list[dict]:
    """The chat messages a client sends for a test conversation: the whole conversation up to its last user turn
    (model templates), or the single user text a single-turn format wraps (`data.instruction`: the input only)."""
    from .data.conversations import prompt_messages, user_content

    last = len(conv.turns) - 1
    if template["kind"] == "model":
        return prompt_messages(conv, last)
    turn = conv.turns[last]
    return [{"role": "user", "content": turn["input"] if data.instruction else user_content(turn)}]


def parity(gguf_file: Path, generator, convs: list, template: dict, config) -> dict:
    """llama.cpp on the GGUF, prompted through the file's own chat template, against tunelab's merged model on the
    prompts training rendered: greedy continuations, prompt tokens, next-token logits, perplexity."""
    import math

    import numpy as np
    import torch

    llama_cpp = _runtime()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    max_new = config.eval.max_new_tokens
    n_ctx = config.model.max_length + max_new + 16
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                          logits_all=True, verbose=False, seed=0)
    embedded = llm.metadata.get("tokenizer.chat_template")
    tokenizer = generator.tokenizer
    formatter = Jinja2ChatFormatter(embedded or "", eos_token=tokenizer.eos_token or "",
                                    bos_token=tokenizer.bos_token or "") if embedded else None
    trained_prompts = [generator.render_conversation(c) for c in convs]
    ours = generator.generate(trained_prompts, max_new_tokens=max_new)
    same_prompt = same_tokens = same_answer = 0
    logit_diffs, nll_ours, nll_gguf, counted = [], 0.0, 0.0, 0
    rows = []
    for conv, trained, mine in zip(convs, trained_prompts, ours):
        messages = user_message(conv, template, config.data)
        prompt = formatter(messages=messages).prompt if formatter else ""
        same_prompt += prompt == trained
        want = tokenizer(trained, add_special_tokens=True)["input_ids"]
        # add_bos=True adds the special tokens the vocabulary asks for, as add_special_tokens=True does
        got = llm.tokenize(prompt.encode(), add_bos=True, special=True) if prompt else []
        same_tokens += list(got) == list(want)
        out = llm.create_completion(got or [tokenizer.eos_token_id], max_tokens=max_new, temperature=0.0, top_k=1,
                                    top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        theirs = out["choices"][0]["text"].strip()
        same_answer += theirs == mine
        rows.append({"prompt": trained, "gguf_prompt": prompt, "tunelab": mine, "gguf": theirs})
        # next-token logits at the end of the trained prompt, and the loss of the reference response after it
        response = tokenizer(conv.turns[-1]["response"], add_special_tokens=False)["input_ids"]
        ids = (want + response + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        ids = ids[:n_ctx - 1]
        llm.reset()
        llm.eval(ids)
        theirs_logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
        mine_logits = generator.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        logit_diffs.append(float(np.abs(theirs_logits[len(want) - 1] - mine_logits[len(want) - 1]).max()))
        targets = np.array(ids[len(want):])
        if len(targets):
            span = slice(len(want) - 1, len(ids) - 1)
            nll_ours += _nll(mine_logits[span], targets)
            nll_gguf += _nll(theirs_logits[span], targets)
            counted += len(targets)
    n = max(len(convs), 1)
    ppl_ours, ppl_gguf = math.exp(nll_ours / max(counted, 1)), math.exp(nll_gguf / max(counted, 1))
    return {"prompts": len(convs), "identical": same_answer / n, "prompts_identical": same_prompt / n,
            "prompt_tokens_identical": same_tokens / n, "template": template["kind"],
            "max_next_token_logit_diff": max(logit_diffs, default=None),
            "median_next_token_logit_diff": float(np.median(logit_diffs)) if logit_diffs else None,
            "perplexity_tunelab": ppl_ours, "perplexity_gguf": ppl_gguf, "perplexity_ratio": ppl_gguf / ppl_ours,
            "response_tokens": counted, "llama_cpp_python": llama_cpp.__version__, "examples": rows[:5]}


def _nll(logits, targets) -> float:
    import numpy as np

    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())
