"""The optional compiled build: with SIDECAR_MYPYC=1, mypyc compiles the modules every proxied
request runs through into C extensions, which import in place of the .py files beside them.

    pip install 'setuptools>=77' mypy types-PyYAML types-jmespath types-protobuf
    SIDECAR_MYPYC=1 pip install --no-build-isolation .

Without the variable (the default, and what `pip install .` does) the package is pure Python.
mypyc type-checks what it compiles, so it needs the runtime dependencies and the stubs it reads
installed beside it: hence --no-build-isolation (the Dockerfile does the same in its first
stage, pinned). README.md, "The compiled build", has what it saves and how it was
measured; scripts/test runs the whole suite against it as well as against the plain build.
"""

import os

from setuptools import setup

# The modules a JSON request runs through: the HTTP/1 ports, the relay and the upstream pool,
# then the pipeline's recording (routes, decoding, extraction, recorders, drift counting). Each
# part paid (README.md, "The compiled build"). Left out: msgspec Structs that mypyc cannot
# compile (msgspec.field defaults, in extract/spec.py) or that msgspec then misreads (the Label
# alias of feedback/recorder.py's FeedbackItem: /feedback refused every label), exceptions
# derived from OSError (proxy/upstream.py), the LLM path (extract/sse.py, presets/openai.py,
# proxy/usage.py, recorders/llm.py: not measured, and a generation costs its model far more than
# the sidecar), and everything off the request path.
COMPILED = [
    "src/sidecar/exchange.py",
    "src/sidecar/pipeline.py",
    "src/sidecar/routes.py",
    "src/sidecar/proxy/bodies.py",
    "src/sidecar/proxy/headers.py",
    "src/sidecar/proxy/http1.py",
    "src/sidecar/proxy/outbox.py",
    "src/sidecar/proxy/pool.py",
    "src/sidecar/proxy/server.py",
    "src/sidecar/extract/__init__.py",
    "src/sidecar/extract/batch.py",
    "src/sidecar/extract/body.py",
    "src/sidecar/extract/compile.py",
    "src/sidecar/extract/custom.py",
    "src/sidecar/extract/errors.py",
    "src/sidecar/extract/navigate.py",
    "src/sidecar/extract/plan.py",
    "src/sidecar/extract/predictions.py",
    "src/sidecar/extract/presets/__init__.py",
    "src/sidecar/extract/presets/base.py",
    "src/sidecar/extract/presets/kserve_v1.py",
    "src/sidecar/extract/presets/mlflow.py",
    "src/sidecar/extract/presets/open_inference_v2.py",
    "src/sidecar/extract/presets/seldon_v1.py",
    "src/sidecar/extract/presets/torchserve.py",
    "src/sidecar/extract/sliced.py",
    "src/sidecar/extract/tables.py",
    "src/sidecar/extract/types.py",
    "src/sidecar/recorders/batch.py",
    "src/sidecar/recorders/labels.py",
    "src/sidecar/recorders/outputs.py",
    "src/sidecar/recorders/quality.py",
    "src/sidecar/recorders/red.py",
    "src/sidecar/drift/counts.py",
    "src/sidecar/drift/recorder.py",
    "src/sidecar/drift/sketches.py",
]


def _extensions() -> list[object]:
    if os.environ.get("SIDECAR_MYPYC") != "1":
        return []
    from mypyc.build import mypycify  # only the compiled build needs mypy

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=_extensions())
