"""Metrics out of the trainer: ``metrics.jsonl`` (always, rank 0) and a W&B run (optional).

Every record is one JSON line ``{"step": int, "kind": "train"|"eval"|"summary", "time": unix,
...metrics}`` with slash-separated metric names (``train/loss``, ``eval/acc``,
``comm/bytes_sent``, ``time/backward_ms``, ...). Ranks other than 0 log nothing.
On resume from step k the lines after k (from the interrupted run) are dropped, atomically.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
import urllib.parse
import uuid
from typing import Any

from dqt.config import LoggerConfig
from dqt.errors import ConfigError

log = logging.getLogger("dqt")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def wandb_mode(cfg: LoggerConfig) -> str:
    """``WANDB_MODE`` from the environment wins over ``logger.mode``."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(cfg: LoggerConfig) -> None:
    """Fail before training (never prompt) when an online W&B run cannot log in."""
    if cfg.name == "wandb" and wandb_mode(cfg) == "online" and not _has_wandb_credentials():
        raise ConfigError("logger.mode", "logger.mode=online needs W&B credentials (set "
                          "WANDB_API_KEY or run `wandb login`); use logger.mode=offline to log "
                          "locally and `wandb sync` later")


class MetricLogger:
    def __init__(self, run_dir: str, is_main: bool, cfg: LoggerConfig, config: dict[str, Any],
                 resume_step: int = 0) -> None:
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_run = None
        if not is_main:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        if cfg.name == "wandb" and wandb_mode(cfg) != "disabled":
            self.wandb_run = self._init_wandb(run_dir, cfg, config)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        records = []
        with open(self.path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    r = None
                if not (isinstance(r, dict) and "step" in r and "kind" in r):
                    log.warning("%s:%d: not a complete metrics record (a write torn by a stop); "
                                "dropped", self.path, n)
                    continue
                records.append((line if line.endswith("\n") else line + "\n", r))
        kept = [line for line, r in records if r["step"] <= step and r["kind"] != "summary"]
        tmp = self.path + ".partial"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    @staticmethod
    def _init_wandb(run_dir: str, cfg: LoggerConfig, config: dict[str, Any]) -> Any:
        import wandb

        id_file = os.path.join(run_dir, "wandb_run_id.txt")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group,
                         tags=list(cfg.tags) or None, name=os.path.basename(run_dir.rstrip("/")),
                         id=run_id, resume="allow", dir=run_dir, config=config,
                         mode=wandb_mode(cfg), settings=wandb.Settings(console="off"))
        run.define_metric("comm/bytes_sent_total")
        run.define_metric("train/loss_vs_bytes", step_metric="comm/bytes_sent_total")
        return run

    def log(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, "kind": kind, "time": time.time(),
                  **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            payload = dict(metrics)
            if "train/loss" in metrics:
                payload["train/loss_vs_bytes"] = metrics["train/loss"]
            if kind == "summary":
                self.wandb_run.summary.update(payload)
            else:
                self.wandb_run.log(payload, step=step)

    def close(self) -> None:
        if not self.is_main:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
