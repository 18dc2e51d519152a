#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on the lent GPU machine (Python 3.12, torch with CUDA already installed there,
# no network): tunelab's pinned libraries and what they need beyond that image, into .whl/ (git-ignored via
# .git/info/exclude). bitsandbytes is trimmed to its CUDA 13.0 and CPU kernels to fit the 64 MiB the tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
v() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }  # as CI tests
for name in transformers peft trl datasets bitsandbytes huggingface_hub tokenizers pydantic pydantic_core \
            annotated-types typing-inspection fastapi starlette uvicorn gguf dill multiprocess nltk openai jiter \
            sniffio httpcore2 httpx2 opentelemetry-api truststore defusedxml click hf-xet anyio h11 idna \
            annotated-doc typing_extensions; do
  version=$(v "$name") || { echo "skipped $name (not in .venv)"; continue; }
  python3 -m pip download -q $P -d .whl "$name==$version"
done
python3 -m pip wheel -q --no-deps -w .whl "rouge-score==$(v rouge-score)"   # published as a source archive only
python3 - <<'PY'
import glob, os, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
keep = lambda n: not n.startswith("bitsandbytes/libbitsandbytes_") or any(k in n for k in ("cuda130", "cpu"))
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if keep(info.filename):
            data = zi.read(info)
            if info.filename.endswith("RECORD"):
                data = b"\n".join(x for x in data.split(b"\n") if keep(x.split(b",")[0].decode()))
            zo.writestr(info, data)
os.replace(src + ".tmp", src)
PY
du -sh .whl
