"""A fake llama.cpp model for the local backend's worker process (no llama-cpp-python needed).

Loaded in the worker by `load` ("tests.explainer.explain.fake_llama:load"), it answers
`create_chat_completion` like llama-cpp-python, and its behaviour is chosen by a word in the query
of the prompt, so one process can meet several cases in a row:

- "crash": the process dies of SIGSEGV, as llama.cpp did on AMX CPUs; "oom": SIGKILL, as the OOM killer;
- "hang": it never answers (a runaway generation);
- "echo": the explanation is the query; "repeat": one sentence said over and over; "junk": "},";
- "boom": a Python exception in the generation (a failed call, not a dead process);
- anything else: a good reply built from the caption.

With CLEARSIGHT_FAKE_LLAMA_LOG set, each load's arguments and each request are written there as JSON
lines, so a test sees exactly what the model was given. Only the standard library is imported.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

#: The query and caption lines of the explain_hit prompts (v1, v2).
_QUERY_RE = re.compile(r"(?:Query \([^)]*\)|searched with a [^:\n]* query): (.*)")
_CAPTION_RE = re.compile(r"(?:Automatic caption|Caption written by the captioning model): (.*)")


def _log(record: dict[str, Any]) -> None:
    path = os.environ.get("CLEARSIGHT_FAKE_LLAMA_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class FakeLlama:
    chat_format = "gemma"

    def __init__(self, model_path: str, **init: Any) -> None:
        self.metadata = {"general.architecture": "gemma3"}
        self.model_path = model_path
        self.init = init

    def create_chat_completion(self, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, Any]:
        _log({"request": {"messages": messages, **kwargs}})
        prompt = "\n".join(m["content"] for m in messages)
        query_match = _QUERY_RE.search(prompt)
        caption_match = _CAPTION_RE.search(prompt)
        query = query_match.group(1).strip() if query_match else ""
        caption = caption_match.group(1).strip() if caption_match else ""
        words = set(query.lower().split())
        if "crash" in words:
            os.kill(os.getpid(), signal.SIGSEGV)
        if "oom" in words:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in words:
            time.sleep(3600)
        if "boom" in words:
            raise RuntimeError("llama_decode returned -1")
        matched = [w for w in query.lower().split() if w in caption.lower().split() and len(w) > 2]
        explanation = f"The caption says {caption}; that is why this image was returned for the search."
        if "echo" in words:
            explanation = query
        elif "repeat" in words:
            explanation = "The dog is on the beach. " * 8
        elif "junk" in words:
            explanation = "},"
        reply = {"explanation": explanation, "matched_concepts": matched, "mismatches": [], "confidence": 0.7}
        content = json.dumps(reply)
        return {
            "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4},
        }


def load(model_path: str, **init: Any) -> FakeLlama:
    _log({"load": {"model_path": model_path, **init}, "env": sorted(os.environ)})
    if os.environ.get("CLEARSIGHT_FAKE_LLAMA_LOAD") == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if os.environ.get("CLEARSIGHT_FAKE_LLAMA_LOAD") == "fail":
        raise ValueError("failed to load model")
    return FakeLlama(model_path, **init)
