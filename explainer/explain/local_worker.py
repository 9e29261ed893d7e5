"""The local model's own process: loads a GGUF model with llama-cpp-python and answers chat requests.

Why a process of its own: llama.cpp is C++, and when it crashes (a segfault in a CPU kernel, the
kernel's OOM killer) it takes its process with it. Run here, the crash ends this process only; the
server sees a closed pipe and an exit status, and the card falls back to the offline text
(`backends/local_process.py` is the other end).

Started as `python -m explainer.explain.local_worker FD` (not through multiprocessing, whose spawn
would re-import the server's entry point, torch included): FD is one end of a socket pair carrying
JSON messages. The first message names a loader ("module:function") and its arguments; the reply is
`{"ok": true, "info": {...}}` or `{"error": "..."}`. Each later message is one chat request, answered
by `{"ok": true, "content": ..., "finish_reason": ..., "usage": ...}` or `{"error": ...}`; `{"quit": true}`
or a closed pipe ends the process. Only the standard library is imported before the loader runs.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

DEFAULT_LOADER = "explainer.explain.local_worker:load_llama"


def load_llama(model_path: str, **init: Any) -> Any:
    """A `llama_cpp.Llama` for `model_path`, with settings that work on every CPU this runs on.

    `use_extra_bufts=False`: llama.cpp's extra CPU buffer types (weight repacking, AMX) segfault on the
    first generation on CPUs with AMX (measured here: exit 139 with them, a reply without). `Llama()`
    swallows unknown keyword arguments, so the flag is set on the model parameters it starts from.
    The chat format: a file without a chat template of Gemma's architecture gets Gemma's turns (the
    packaged 270M file has none, and llama-cpp-python would otherwise use llama-2's).
    """
    llama_cpp: Any = importlib.import_module("llama_cpp")
    low: Any = importlib.import_module("llama_cpp.llama_cpp")
    extra_bufts = bool(init.pop("use_extra_bufts", False))
    defaults = low.llama_model_default_params

    def params() -> Any:
        p = defaults()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = extra_bufts
        return p

    low.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=model_path, **init)
    finally:
        low.llama_model_default_params = defaults
    metadata = getattr(llm, "metadata", {}) or {}
    gemma = str(metadata.get("general.architecture", "")).startswith("gemma")
    if gemma and "chat_format" not in init and "tokenizer.chat_template" not in metadata:
        llm.chat_format = "gemma"
    return llm


def _info(model: Any) -> dict[str, Any]:
    metadata = getattr(model, "metadata", {}) or {}
    return {
        "chat_format": getattr(model, "chat_format", None),
        "architecture": metadata.get("general.architecture"),
        "n_threads": getattr(getattr(model, "context_params", None), "n_threads", None),
    }


def _loader(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn


def _send(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode("utf-8"))


def _answer(model: Any, request: dict[str, Any]) -> dict[str, Any]:
    reply = model.create_chat_completion(
        messages=request["messages"],
        response_format={"type": "json_object", "schema": request["schema"]},
        **request.get("options", {}),
    )
    choice = reply["choices"][0]
    return {
        "ok": True,
        "content": choice["message"].get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "usage": reply.get("usage") or {},
    }


def serve(conn: Connection) -> int:
    """Load, then answer requests until told to quit or the other end goes away."""
    try:
        start = json.loads(conn.recv_bytes())
    except EOFError:
        return 0
    try:
        model = _loader(start["loader"])(start["model_path"], **start.get("init", {}))
    except Exception as exc:  # reported to the parent, which says why the model is unavailable
        _send(conn, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(conn, {"ok": True, "info": _info(model)})
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return 0
        if request.get("quit"):
            return 0
        try:
            _send(conn, _answer(model, request))
        except Exception as exc:  # a failed generation is one card's fallback, not the process's end
            _send(conn, {"error": f"{type(exc).__name__}: {exc}"})


def main(argv: list[str]) -> int:
    faulthandler.enable()  # a crash in llama.cpp leaves its Python stack in the log the parent reads
    return serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
