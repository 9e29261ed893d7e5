"""The server's end of the local model's process (`explainer/explain/local_worker.py` is the other).

What it guarantees: a crash of the model (a segfault in llama.cpp, the OOM killer) or a generation
past its timeout never takes the server down nor blocks it: each becomes an `LLMError` that the
chain turns into the card's offline text, with a reason that says what happened. A process past its
deadline is killed (a C++ loop cannot be interrupted from Python), and the next call starts a fresh
one. A model that crashes `max_crashes` times in a row, or cannot be loaded, is not started again:
later calls fail at once with the reason instead of paying a load and a crash per card.

One process, one request at a time (a llama.cpp context is not shareable); calls are serialised here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import IO, Any

from explainer.errors import LLMCrashed, LLMError, LLMTimeout

log = logging.getLogger(__name__)

WORKER_MODULE = "explainer.explain.local_worker"
#: Lines of the process's stderr quoted in a crash's reason (llama.cpp's abort message, Python's
#: fault handler), and the characters they may take.
_TAIL_LINES = 3
_TAIL_CHARS = 400
_POLL_S = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    """What the process loads: `loader` ("module:function") called with the model path and `init`."""

    loader: str
    model_path: str
    init: dict[str, Any] = field(default_factory=dict)
    #: Loading is not generating: it reads the file once, so it has its own, longer deadline.
    load_timeout_s: float = 120.0


def describe_exit(code: int | None) -> str:
    """An exit status in words: a signal's name and what it usually means here."""
    if code is None:
        return "still running"
    signum = -code if code < 0 else code - 128 if code > 128 else None
    if signum is None:
        return f"exit code {code}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    meanings: dict[int, str] = {
        signal.SIGSEGV: "a crash in the model's native code",
        signal.SIGABRT: "the model's native code aborted",
        signal.SIGKILL: "killed, most often by the kernel for lack of memory",
        signal.SIGBUS: "a crash in the model's native code",
        signal.SIGILL: "an instruction this CPU lacks",
    }
    meaning = meanings.get(signum, "")
    return f"{name}, exit {128 + signum} in a shell" + (f": {meaning}" if meaning else "")


#: Secrets of the server that the model's process has no use for; they are not handed to it.
_WITHHELD = ("GROQ_API_KEY", "CLEARSIGHT_API_TOKEN")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _WITHHELD}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """Starts the model's process on first use; `call` sends one request and waits at most `timeout_s`."""

    def __init__(self, spec: WorkerSpec, label: str, *, max_crashes: int = 2) -> None:
        self.spec = spec
        self.label = label
        self.max_crashes = max_crashes
        #: What the process said of itself once loaded (chat format, architecture, threads).
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._log: IO[bytes] | None = None
        self._crashes = 0
        self._disabled: str | None = None
        #: Processes started, for tests and logs (a restart after a crash or a kill adds one).
        self.starts = 0

    @property
    def disabled(self) -> str | None:
        """Why the model is not started any more, or None."""
        return self._disabled

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> dict[str, Any]:
        """Start and load the model unless running; what the process said of itself (`info`)."""
        with self._lock:
            if self._disabled is not None:
                raise LLMCrashed(self._disabled)
            self._ensure_started()
            return self.info

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The process's answer to `request` (a dict with "ok" or "error"), within `timeout_s` of
        generation; LLMCrashed when the process dies, LLMTimeout (the process killed) past the deadline."""
        with self._lock:
            if self._disabled is not None:
                raise LLMCrashed(self._disabled)
            self._ensure_started()
            assert self._conn is not None
            try:
                self._conn.send_bytes(json.dumps(request).encode("utf-8"))
            except OSError:
                self._crashed("taking a request")
            reply = self._receive(timeout_s, "generating")
            self._crashes = 0
            return reply

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._cleanup()
        ours, theirs = Pipe(duplex=True)
        self._log = tempfile.TemporaryFile(prefix="clearsight-local-")  # noqa: SIM115 - closed by _cleanup
        fd = theirs.fileno()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(fd)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                env=_child_env(),
            )
        except OSError as exc:
            ours.close()
            self._disabled = f"{self.label}: cannot start the model's process: {exc}"
            raise LLMCrashed(self._disabled) from None
        finally:
            theirs.close()
        self._conn = ours
        self.starts += 1
        start = {"loader": self.spec.loader, "model_path": self.spec.model_path, "init": self.spec.init}
        ours.send_bytes(json.dumps(start).encode("utf-8"))
        reply = self._receive(self.spec.load_timeout_s, "loading the model")
        if "error" in reply:
            self._stop()
            self._disabled = f"{self.label}: cannot load {self.spec.model_path}: {reply['error']}"
            raise LLMCrashed(self._disabled)
        self.info = dict(reply.get("info") or {})
        log.info("%s: model process %d ready (%s)", self.label, self._proc.pid, self.info)

    def _receive(self, timeout_s: float, what: str) -> dict[str, Any]:
        assert self._conn is not None and self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stop(kill=True)
                raise LLMTimeout(
                    f"{self.label}: no answer within {timeout_s:g} s while {what}; its process was stopped"
                )
            try:
                ready = self._conn.poll(min(remaining, _POLL_S))
                if ready:
                    message = json.loads(self._conn.recv_bytes())
                    if not isinstance(message, dict):
                        raise LLMError(f"{self.label}: the model's process sent {type(message).__name__}")
                    return message
            except (EOFError, OSError):
                self._crashed(what)
            if self._proc.poll() is not None:
                self._crashed(what)

    def _crashed(self, what: str) -> None:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # the pipe closed but the process lingers: end it
            self._proc.kill()
            code = self._proc.wait()
        tail = self._log_tail()
        self._cleanup()
        self._crashes += 1
        reason = f"{self.label}: the model's process died while {what} ({describe_exit(code)})"
        if tail:
            reason += f"; its last words: {tail}"
        log.error("%s", reason)
        if self._crashes >= self.max_crashes:
            self._disabled = f"{reason}; not restarted after {self._crashes} crashes in a row"
        raise LLMCrashed(reason)

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 4096))
            text = self._log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
        if fatal:  # the fault handler's report: what happened, and the innermost frame (most recent first)
            frames = [line for line in lines[fatal[-1] + 1 :] if line.startswith("File ")]
            tail = " | ".join([lines[fatal[-1]], *frames[:1]])
        else:
            tail = " | ".join(lines[-_TAIL_LINES:])
        return tail[-_TAIL_CHARS:]

    def _stop(self, *, kill: bool = False) -> None:
        proc, conn = self._proc, self._conn
        if proc is not None and proc.poll() is None:
            if not kill and conn is not None:
                try:
                    conn.send_bytes(b'{"quit": true}')
                    proc.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._log is not None:
            self._log.close()
        self._proc = self._conn = self._log = None

    def close(self) -> None:
        """End the process (asked first, killed after two seconds)."""
        with self._lock:
            self._stop()
