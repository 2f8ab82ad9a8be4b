"""What a run prints on rank 0: a progress bar on a terminal, log lines otherwise, and bytes
in human units."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("dqt")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...


def progress(is_main: bool, start: int, total: int) -> Any:
    """A tqdm bar on rank 0 when attached to a terminal; plain log lines otherwise."""
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")
    return NoBar()


def report(bar: Any, step: int, total: int, m: dict[str, float], comm: dict[str, float]) -> None:
    line = (f"loss {m['train/loss']:.4f} acc {m['train/acc']:.3f} | step {m['time/step_ms']:.1f} ms"
            f" (data {m['time/data_ms']:.1f}, fwd {m['time/forward_ms']:.1f}, bwd+comm "
            f"{m['time/backward_ms']:.1f}, opt {m['time/optim_ms']:.1f}) | sent "
            f"{fmt_bytes(comm['comm/bytes_sent'])}/rank")
    if isinstance(bar, NoBar):
        log.info("step %d/%d %s", step, total, line)
    else:
        bar.set_postfix_str(line)
