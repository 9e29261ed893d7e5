"""Encoder actors for tests: ones that misbehave on purpose, so tests can kill Ray workers mid-run for real,
and one that counts what it encodes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from retrieval.distributed.stages import Batch, EncodeActor
from retrieval.encoders import EncoderConfig


class FaultyEncodeActor(EncodeActor):
    """Dies (os._exit, as a crashed or OOM-killed worker would) on its first batch if `crash_marker`
    does not exist yet, creating it first so exactly one actor crashes once; sleeps `delay_s` before
    each batch, so a test can kill the driver while batches are still in flight."""

    def __init__(
        self, config: EncoderConfig, threads: int | None = None, crash_marker: str = "", delay_s: float = 0.0
    ) -> None:
        super().__init__(config, threads)
        self.crash_marker = crash_marker
        self.delay_s = delay_s

    def __call__(self, batch: Batch, surgery: bool | None = None) -> Batch:
        if self.crash_marker:
            try:
                fd = os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().__call__(batch, surgery)


class CountingEncodeActor(EncodeActor):
    """Appends to `count_file` how many images of each batch it really encoded (not failed, not
    content embedded already), so a test can see work skipped rather than infer it from results."""

    def __init__(self, config: EncoderConfig, threads: int | None = None, count_file: str = "") -> None:
        super().__init__(config, threads)
        self.count_file = count_file

    def __call__(self, batch: Batch, surgery: bool | None = None) -> Batch:
        encoded = sum(1 for e, d in zip(batch["error"], batch["dup"], strict=True) if not e and not d)
        with open(self.count_file, "a") as f:
            f.write(f"{encoded}\n")
        return super().__call__(batch, surgery)


def encoded_count(count_file: Path) -> int:
    return sum(int(x) for x in count_file.read_text().split()) if count_file.exists() else 0


def crashed(marker: Path) -> bool:
    return marker.exists() and marker.read_text().strip().isdigit()
