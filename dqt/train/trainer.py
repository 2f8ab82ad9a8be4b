"""The training loop: one step = data → forward → backward (DDP hook communicates) → optimizer.

Every rank runs the same code; rank 0 alone writes metrics and the console. The model is built
from the same seed on every rank (identical init), then each rank reseeds with seed + rank for
its own randomness (dropout). After the run all ranks compare a hash of their parameters
(``docs/design.md``, invariant 1) and the result is logged in the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from dqt.comm.config import CompressedConfig, OneBitConfig
from dqt.comm.onebit_adam import MomentumComm, OneBitAdam
from dqt.comm.parallel import data_parallel
from dqt.config import OptimConfig, TrainConfig
from dqt.errors import (ConfigError, NoSpace, PeerLost, TrainingDiverged, first_lines,
                        no_space)
from dqt.optim import FrozenVarianceAdamW
from dqt.quant.config import QATConfig
from dqt.quant import QAT, quantize_
from dqt.train import distributed, preempt, sharded
from dqt.train.console import fmt_bytes, progress, report
from dqt.train.checkpoint import (Checkpointer, load_weights, remove_stale, rng_state,
                                  set_rng_state)
from dqt.train.data import ShardedLoader, build_dataset, eval_shard
from dqt.train.heartbeat import comm_failure, start_heartbeat
from dqt.train.metrics import MetricLogger, check_logger
from dqt.train.models import build_model

log = logging.getLogger("dqt")


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, Any]
    model_state: dict[str, torch.Tensor] = field(repr=False)
    preempted: bool = False


def param_groups(cfg: OptimConfig, model: torch.nn.Module, qat: Optional[QATConfig] = None
                 ) -> list[dict[str, Any]]:
    """The optimizer's param groups: ``model`` (every trainable parameter but the quantizers',
    ``optim.lr`` and ``optim.weight_decay``) and, when the model has quantizer parameters (TTQ
    W_p/W_n, LSQ s, PACT α), ``quantizer`` with lr = ``optim.lr × qat.quantizer_lr_mult`` and
    weight decay ``qat.quantizer_weight_decay`` (:meth:`dqt.quant.QAT.param_groups`)."""
    return QAT(model, qat).param_groups(cfg.lr)


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, qat: Optional[QATConfig] = None,
                    comm: Optional[Any] = None, freeze: bool = False) -> torch.optim.Optimizer:
    """SGD / AdamW / Adam / 1-bit Adam over :func:`param_groups` (group 0 = the model's own
    parameters); ``freeze``: Adam(W) with its variance frozen after ``freeze_steps``
    (:class:`dqt.optim.FrozenVarianceAdamW`), for gradients a dqt codec compresses."""
    groups = param_groups(cfg, model, qat)
    if freeze:
        return FrozenVarianceAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, freeze_steps=cfg.freeze_steps,
                                   decoupled=cfg.name == "adamw")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "onebit_adam":  # ``comm``: its MomentumComm, attached to the DDP model
        return OneBitAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                          weight_decay=cfg.weight_decay, freeze_steps=cfg.freeze_steps, comm=comm)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
               weight_decay=cfg.weight_decay)


def _scheme_warm_up(cfg: TrainConfig) -> Any:
    """The scheme config to run: with a frozen-variance Adam(W), its uncompressed warm-up
    covers the steps that estimate the variance (``optim.freeze_steps``)."""
    scheme = cfg.scheme
    if (isinstance(scheme, CompressedConfig) and not scheme.vote and not cfg.frozen_variance
            and cfg.optim.name in ("adam", "adamw")):
        log.warning("%s with %s and optim.freeze_variance=false: the codec's noise inflates "
                    "Adam's variance; this combination trained the character GPT 0.2-0.3 nats "
                    "worse than fp32 (docs/comm.md)", scheme.name, cfg.optim.name)
    if cfg.frozen_variance and scheme.warmup_steps < cfg.optim.freeze_steps:
        log.info("%s with %s: the first %d steps are uncompressed while Adam estimates its "
                 "variance, which is then frozen (optim.freeze_steps; optim.freeze_variance=false "
                 "turns this off)", scheme.name, cfg.optim.name, cfg.optim.freeze_steps)
        scheme = dataclasses.replace(scheme, warmup_steps=cfg.optim.freeze_steps)
    return scheme


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant / cosine / linear decay to
    ``min_lr_ratio``·lr at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(sharded.full_state_dict(model).items()):  # (FSDP: gathered)
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stop_agreed(device: torch.device) -> bool:
    """Did any rank get a stop signal (dqt.train.preempt)? Max over ranks, at a step boundary."""
    flag = torch.tensor([1.0 if preempt.requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        preempt.install()  # launch/train.py did already; for programmatic use
        check_logger(cfg.logger)
        self.env = distributed.detect()
        self.checkpointer = Checkpointer(run_dir, self.env.rank, self.env.world_size,
                                         cfg.checkpoint)
        resume = self.checkpointer.latest() if cfg.checkpoint.resume else None
        restore_rank_state = resume is not None and self.checkpointer.check_world_size(resume)
        self.backend, self.device = distributed.init(self.env, cfg.backend)
        if self.env.world_size > 1:  # before anything else is written into it
            distributed.check_shared_dir(run_dir, self.env.rank, self.env.world_size)
        if self.env.is_main:
            for path in remove_stale(run_dir):
                log.warning("removed %s, left by an interrupted write", path)
        self.heartbeat = start_heartbeat(self.env.rank, self.env.world_size)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)

        self.data = build_dataset(cfg.data)
        torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
        model = build_model(cfg.model, self.data.meta)
        if cfg.checkpoint.init_from and resume is None:  # fine-tuning: weights before quantizers
            src = load_weights(model, cfg.checkpoint.init_from, "checkpoint.init_from")
            log.info("initial weights from %s", src)
        elif cfg.checkpoint.init_from:
            log.info("checkpoint.init_from ignored: resuming from %s", resume.path)
        self.qat = quantize_(model, cfg.qat)
        model = model.to(self.device)
        # DDP, or Horovod's collectives under DDP's buckets; the scheme is the comm hook (with
        # optim=onebit_adam the optimizer communicates and DDP leaves the gradients local)
        scheme = MomentumComm(cfg.scheme or OneBitConfig()) \
            if cfg.optim.name == "onebit_adam" else _scheme_warm_up(cfg)
        self.model, self.scheme = data_parallel(model, scheme, self.backend, self.device,
                                                cfg.backend.bucket_cap_mb, cfg.backend.parallel,
                                                cfg.backend.fsdp_gather)
        self.sharded = cfg.backend.parallel == "fsdp"  # checkpoints through DCP
        self.optimizer = build_optimizer(cfg.optim, model, cfg.qat, comm=self.scheme,
                                         freeze=cfg.frozen_variance)
        if cfg.frozen_variance and cfg.optim.precondition:  # the codec works in Adam's units
            self.scheme.set_preconditioner(self.optimizer.preconditioner,
                                           self.optimizer.step_bound)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg.optim, s, cfg.steps))
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.precision.name)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.precision.name == "fp16",
            init_scale=cfg.precision.init_scale, growth_interval=cfg.precision.growth_interval)
        torch.manual_seed(cfg.seed + 1 + self.env.rank)  # per-rank randomness from here on

        self.step, self.wall_before, self._fit_start = 0, 0.0, time.perf_counter()
        if resume is not None:
            self._restore(resume, restore_rank_state)
        self.loader = ShardedLoader(self.data.train, cfg.data.batch_size, self.env.rank,
                                    self.env.world_size, seed=cfg.seed,
                                    start_step=self.step * cfg.grad_accum)
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        if self.env.is_main:
            _write_atomic(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(resolved))
        self.logger = MetricLogger(run_dir, self.env.is_main, cfg.logger, resolved,
                                   resume_step=self.step)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("run dir %s | %s ranks (%s, %s) | rank %d on %s | model %s %.2fM params | data "
                 "%s | scheme %s | qat %s | precision %s%s", run_dir, self.env.world_size,
                 self.env.launcher, self.backend, self.env.rank,
                 os.environ.get("SLURMD_NODENAME") or socket.gethostname(), cfg.model.name,
                 n_params / 1e6, cfg.data.name, self.scheme.name, cfg.qat.name,
                 cfg.precision.name, f" | resumed from step {self.step}" if resume else "")

    # ------------------------------------------------------------------ checkpoint
    def _restore(self, ckpt: Any, with_rank_state: bool) -> None:
        shared, per_rank = self.checkpointer.load(ckpt, with_rank_state)
        same_scheme = self._check_scheme(ckpt, shared.get("scheme"))
        if self.sharded:  # model, optimizer and residuals: DCP, resharded on a new world size
            sharded.load(ckpt.path, self.model.module, self.optimizer,
                         self.scheme if same_scheme else None, ckpt.world_size,
                         self.env.world_size, self.cfg.checkpoint.reshard_residuals)
        self._load_replicated(ckpt, shared)
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.step = shared["step"]
        self.wall_before = float(shared.get("wall_s", 0.0))  # earlier attempts' training time
        if per_rank is not None:
            set_rng_state(per_rank["rng"])
            if same_scheme and per_rank["scheme"] is not None:
                self.scheme.load_state_dict(per_rank["scheme"])
            # running totals continue across resumes (what a loss-vs-bytes plot reads)
            totals = per_rank.get("comm_totals", {})
            self.scheme.meter.total_sent = int(totals.get("bytes_sent", 0))
            self.scheme.meter.total_raw = int(totals.get("bytes_raw", 0))
        else:
            log.warning("world size changed (%d → %d): restored model and optimizer%s only",
                        ckpt.world_size, self.env.world_size,
                        " (resharded) and the error-feedback residuals' " +
                        ("mean" if self.cfg.checkpoint.reshard_residuals else "steps (zeroed)")
                        if self.sharded else "")

    def _load_replicated(self, ckpt: Any, shared: dict[str, Any]) -> None:
        """Model and optimizer from ``train.pt`` (DDP runs; FSDP runs keep them in DCP)."""
        if self.sharded:
            return
        try:
            self.model.module.load_state_dict(shared["model"])
        except RuntimeError as e:  # torch lists every mismatch, one per line
            raise ConfigError("checkpoint.resume", f"{ckpt.path} holds a different model "
                              f"({first_lines(e)}); resume with the model it was trained "
                              "with, or set checkpoint.resume=false (or a new hydra.run.dir) "
                              "to start over") from None
        try:
            self.optimizer.load_state_dict(shared["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ConfigError("optim.name", f"{ckpt.path} holds the state of another optimizer "
                              f"or parameter grouping ({type(e).__name__}: {first_lines(e)}); "
                              "resume with the optimizer it was trained with, or set "
                              "checkpoint.resume=false (or a new hydra.run.dir)") from None

    def _check_scheme(self, ckpt: Any, saved: str | None) -> bool:
        """Resuming with the checkpoint's scheme? Another one is refused (its per-rank state,
        the error-feedback residuals, would be dropped without a word) unless
        ``checkpoint.allow_scheme_change``, which warns."""
        if saved is None or saved == self.scheme.name:
            return True
        if not self.cfg.checkpoint.allow_scheme_change:
            raise ConfigError(
                "checkpoint.allow_scheme_change",
                f"{ckpt.path} was written with scheme '{saved}' but this run has "
                f"'{self.scheme.name}'. Resume with the same scheme, or set "
                "checkpoint.allow_scheme_change=true to continue the model and optimizer with "
                f"the new scheme (the state of '{saved}', e.g. its error-feedback residuals, is "
                "dropped), or start a new run directory.")
        log.warning("scheme changed on resume ('%s' → '%s', checkpoint.allow_scheme_change): "
                    "model and optimizer restored; '%s' starts with fresh state", saved,
                    self.scheme.name, self.scheme.name)
        return False

    def save(self) -> str:
        # the parameters are identical on every rank, so every rank decides alike
        if not sharded.params_finite(self.model.module):
            raise TrainingDiverged(f"step {self.step}: the parameters are not finite; no "
                                   f"checkpoint written. {self._checkpoint_note()} Lower "
                                   f"optim.lr (now {self.cfg.optim.lr:g}) or set optim.grad_clip")
        replicated = {} if self.sharded else {"model": self.model.module.state_dict(),
                                              "optimizer": self.optimizer.state_dict()}
        shared = {**replicated,
                  "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                  "step": self.step, "data_meta": dataclasses.asdict(self.data.meta),
                  "wall_s": self._wall_s(), "scheme": self.scheme.name}
        meter = self.scheme.meter
        per_rank = {"rng": rng_state(),
                    "scheme": None if self.sharded else self.scheme.state_dict(),
                    "params_sha256": params_digest(self.model.module),  # this rank's own copy
                    "comm_totals": {"bytes_sent": meter.total_sent, "bytes_raw": meter.total_raw}}
        path = self.checkpointer.save(self.step, shared, per_rank, functools.partial(
            sharded.save, model=self.model.module, optimizer=self.optimizer,
            scheme=self.scheme) if self.sharded else None)
        log.info("checkpoint step %d → %s", self.step, path)
        return path

    # ------------------------------------------------------------------ one step
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_correct(self.model, x, y, self.autocast_dtype)

    def train_step(self, batches: Iterator) -> dict[str, float]:
        cfg, t = self.cfg, {"data": 0.0, "forward": 0.0, "backward": 0.0, "optim": 0.0}
        sums = torch.zeros(3, dtype=torch.float64)  # loss·n, correct, n
        self.model.train()
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            x, y = (b.to(self.device, non_blocking=True) for b in next(batches))
            t1 = time.perf_counter()
            sync = micro == cfg.grad_accum - 1
            if sync:
                self.scheme.set_grad_scale(self.scaler.get_scale() if self.scaler.is_enabled()
                                           else 1.0)
            with (self.model.no_sync() if not sync else contextlib.nullcontext()):
                loss, correct = self._loss(x, y)
                t2 = time.perf_counter()
                self.scaler.scale(loss / cfg.grad_accum).backward()
            self._sync_device()
            t3 = time.perf_counter()
            n = y.numel()
            sums += torch.tensor([loss.item() * n, correct.item(), n], dtype=torch.float64)
            t["data"] += t1 - t0
            t["forward"] += t2 - t1
            t["backward"] += t3 - t2
        t4 = time.perf_counter()
        if not self.scaler.is_enabled():  # (a GradScaler skips non-finite steps itself)
            self._stop_if_diverged(sums[0].item())
        if self.scaler.is_enabled() and isinstance(self.optimizer, OneBitAdam):
            agree_on_overflow(list(self.model.module.parameters()), self.device)
        if cfg.optim.grad_clip > 0 or self.qat.active:
            self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        self.qat.before_step()  # quantizer penalty gradients (ADMM), on the all-reduced gradients
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.qat.after_step()  # quantizer statistics (EMA, Autoflex) synced over ranks, BNN clip
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync_device()
        t["optim"] = time.perf_counter() - t4
        self.step += 1
        out = {f"time/{k}_ms": 1e3 * v for k, v in t.items()}
        out["time/step_ms"] = sum(out.values())
        out["_sums"] = sums  # reduced across ranks only on log steps
        return out

    def _stop_if_diverged(self, local_loss: float) -> None:
        """Every rank agrees whether some rank's loss is non-finite; if so, all raise
        :class:`TrainingDiverged` before the optimizer step, so no non-finite parameters are
        ever stepped into or checkpointed."""
        bad = torch.tensor([0.0 if math.isfinite(local_loss) else 1.0], device=self.device)
        flags = [torch.zeros_like(bad) for _ in range(self.env.world_size)]
        dist.all_gather(flags, bad)
        ranks = [r for r, f in enumerate(flags) if f.item()]
        if ranks:
            raise TrainingDiverged(
                f"step {self.step + 1}: the training loss is not finite on rank(s) "
                f"{', '.join(map(str, ranks))}; stopped before the optimizer step. "
                f"{self._checkpoint_note()} Lower optim.lr (now {self.cfg.optim.lr:g}) or set "
                "optim.grad_clip")

    def _checkpoint_note(self) -> str:
        last = self.checkpointer.latest_step()
        return "No checkpoint was written." if last is None else \
            f"The newest checkpoint (step {last}) holds finite parameters."

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        sums = eval_sums(self.model, self.data.test, self.cfg.data.eval_batch_size, self.device,
                         self.autocast_dtype, self.env.rank, self.env.world_size,
                         lockstep=self.sharded)
        return eval_metrics(self._all_sum(sums))

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg = self.cfg
        batches = iter(self.loader)
        bar = progress(self.env.is_main, self.step, cfg.steps)
        step_ms: list[float] = []
        start = self._fit_start = time.perf_counter()
        first_step, preempted = self.step, False
        try:
            preempted, last_eval = self._loop(batches, bar, step_ms)
        except RuntimeError as e:
            if isinstance(e, TrainingDiverged) or not comm_failure(e):
                raise
            raise self._peer_lost(e) from e
        bar.close()
        if not last_eval:  # resumed a finished run: nothing trained, still report the metric
            last_eval = self.evaluate()
        if self.checkpointer.latest_step() != self.step:
            self.save()
        summary = self._summary(last_eval, step_ms, time.perf_counter() - start, preempted,
                                first_step)
        self.logger.log(self.step, "summary", summary)
        self.logger.close()
        if preempted:
            log.info("%s: stopped at step %d with a checkpoint; run again with "
                     "hydra.run.dir=%s to resume",
                     preempt.received_name() or "a stop signal on another rank", self.step,
                     self.run_dir)
        return TrainResult(self.step, summary, sharded.full_state_dict(self.model.module),
                           preempted)

    def _loop(self, batches: Iterator, bar: Any, step_ms: list[float]
              ) -> tuple[bool, dict[str, float]]:
        """Train to ``steps`` or a stop signal: (preempted, the last evaluation)."""
        cfg = self.cfg
        samples_per_step = cfg.data.batch_size * cfg.grad_accum * self.env.world_size
        last_eval: dict[str, float] = {}
        while self.step < cfg.steps:
            m = self.train_step(batches)
            comm = self.scheme.stats()
            step_ms.append(m["time/step_ms"])
            bar.update(1)
            is_last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or is_last:
                sums = self._all_sum(m.pop("_sums"))
                m.update({"train/loss": sums[0].item() / sums[2].item(),
                          "train/acc": sums[1].item() / sums[2].item(),
                          "lr": self.scheduler.get_last_lr()[0],
                          "throughput/samples_per_s": samples_per_step / (m["time/step_ms"] / 1e3)})
                if self.scaler.is_enabled():
                    m["precision/loss_scale"] = self.scaler.get_scale()
                self.logger.log(self.step, "train", {**m, **comm})
                report(bar, self.step, cfg.steps, m, comm)
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or is_last:
                last_eval = self.evaluate()
                self.logger.log(self.step, "eval", last_eval)
                log.info("step %d/%d eval loss %.4f acc %.4f", self.step, cfg.steps,
                         last_eval["eval/loss"], last_eval["eval/acc"])
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not is_last:
                self.save()
            if not is_last and _stop_agreed(self.device):
                return True, last_eval
        return False, last_eval

    def _peer_lost(self, e: RuntimeError) -> PeerLost:
        """The one-line report of a collective that failed for want of a peer."""
        text = str(e).lower()
        cause = "timed out" if "timed out" in text or "timeout" in text else \
            "lost its connection to a peer"
        silent = self.heartbeat.silent_ranks() if self.heartbeat else []
        who = (f"rank(s) {', '.join(map(str, silent))} stopped answering (no heartbeat for "
               f"{3 * self.heartbeat.interval:.0f} s: frozen or gone)" if silent else
               "every other rank's heartbeat is alive")
        return PeerLost(f"rank {self.env.rank}: a collective {cause} at step {self.step + 1}; "
                        f"{who}. Collectives wait at most backend.timeout_s="
                        f"{self.cfg.backend.timeout_s} s. {self._checkpoint_note()}")

    def _wall_s(self) -> float:
        """Training time of every attempt of this run so far (resumes add up)."""
        return self.wall_before + time.perf_counter() - self._fit_start

    def _summary(self, last_eval: dict[str, float], step_ms: list[float], attempt_s: float,
                 preempted: bool, first_step: int) -> dict[str, Any]:
        """The run's summary; totals (bytes, ``wall_s``) cover every attempt since step 0,
        ``attempt/*`` this process's own."""
        digests: list[str] = [""] * self.env.world_size
        dist.all_gather_object(digests, params_digest(self.model.module))
        meter = self.scheme.meter
        summary: dict[str, Any] = {
            **last_eval, "steps": self.step, "world_size": self.env.world_size,
            "model/params": sum(p.numel() for p in self.model.module.parameters()),
            "scheme": self.scheme.name, "qat": self.cfg.qat.name,
            "wall_s": self.wall_before + attempt_s, "attempt/wall_s": attempt_s,
            "attempt/first_step": first_step,
            "time/step_ms_median": sorted(step_ms)[len(step_ms) // 2] if step_ms else None,
            "comm/bytes_sent_total": meter.total_sent, "comm/bytes_raw_total": meter.total_raw,
            "comm/bytes_sent_per_step": meter.total_sent / max(1, self.step),
            "params_in_sync": len(set(digests)) == 1, "params_sha256": digests[0],
            "preempted": preempted,
        }
        if meter.total_sent:
            summary["comm/ratio"] = meter.total_raw / meter.total_sent
        if self.qat.active:
            size = self.qat.summary()
            summary.update({"qat/packed_bytes": size["packed_bytes"],
                            "qat/fp32_bytes": size["fp32_bytes"],
                            "qat/compression": size["compression"],
                            "qat/params_by_bits": size["params_by_bits"]})
            log.info("qat size summary\n%s", self.qat.format_summary(size))
        if not summary["params_in_sync"]:
            log.error("parameters differ across ranks at the end of the run: %s", digests)
        sent, raw = meter.total_sent, meter.total_raw
        metric = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
        base = "fp32 reduce-scatter" if self.sharded else "fp32 all-reduce"
        wire = (f"sent {fmt_bytes(sent)}/rank ({base}: {fmt_bytes(raw)}, saved "
                f"{fmt_bytes(raw - sent)}, {raw / sent:.1f}x)" if sent else
                "nothing crossed a wire (one rank)")
        log.info("done: %d steps in %.1f s | %s | %s | params identical on all ranks: %s",
                 self.step, summary["wall_s"], metric, wire, summary["params_in_sync"])
        return summary


def agree_on_overflow(params: list[torch.Tensor], device: torch.device) -> None:
    """GradScaler skips a step when *this rank's* gradients overflow. With an optimizer that
    communicates local gradients (onebit_adam) the ranks must agree: if any rank's scaled
    gradients hold inf/NaN, every rank marks one of its own gradients inf, so every GradScaler
    skips the step and backs off its scale alike."""
    grads = [p.grad for p in params if p.grad is not None]
    local = any(not torch.isfinite(g).all() for g in grads)
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not local and grads:
        grads[0].view(-1)[0] = float("inf")


def loss_and_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     autocast_dtype: Optional[torch.dtype] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and the number of correct argmax predictions (LM: per token)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    logits = logits.float().flatten(0, -2) if logits.dim() > 2 else logits.float()
    y = y.flatten()
    correct = (logits.argmax(-1) == y).sum()
    return F.cross_entropy(logits, y), correct


@torch.no_grad()
def eval_sums(model: torch.nn.Module, split: Any, batch_size: int, device: torch.device,
              autocast_dtype: Optional[torch.dtype] = None, rank: int = 0, world_size: int = 1,
              lockstep: bool = False) -> torch.Tensor:
    """(loss·n, correct, n) over this rank's shard of ``split`` (fp64; sum over ranks, then
    :func:`eval_metrics`). The caller puts the model in eval mode. ``lockstep``: every rank
    runs as many forwards as the largest shard needs (FSDP's forward is a collective); the
    extra ones are not counted."""
    idx = eval_shard(len(split), rank, world_size)
    sums = torch.zeros(3, dtype=torch.float64)
    if lockstep and len(split):
        most = max(-(-len(eval_shard(len(split), r, world_size)) // batch_size)
                   for r in range(world_size))
        for _ in range(most - len(idx.split(batch_size))):
            x, y = (b.to(device) for b in split.batch(torch.arange(1)))
            loss_and_correct(model, x, y, autocast_dtype)
    for chunk in idx.split(batch_size):
        x, y = (b.to(device) for b in split.batch(chunk))
        loss, correct = loss_and_correct(model, x, y, autocast_dtype)
        n = y.numel()
        sums += torch.tensor([loss.item() * n, correct.item(), n], dtype=torch.float64)
    return sums


def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
    return {"eval/loss": sums[0].item() / sums[2].item(),
            "eval/acc": sums[1].item() / sums[2].item()}


def _write_atomic(path: str, text: str) -> None:
    try:
        with open(path + ".partial", "w") as f:
            f.write(text)
    except OSError as e:
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
        if not no_space(e):
            raise
        raise NoSpace(f"no space left on device writing {path} (need ~{len(text) / 1e6:.2f} "
                      "MB)") from None
    os.replace(path + ".partial", path)


def train(cfg: TrainConfig, run_dir: str) -> TrainResult:
    """Run one training job in this process (one rank); tears the process group down."""
    os.makedirs(run_dir, exist_ok=True)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        result = trainer.fit()
    except BaseException:
        distributed.teardown()
        raise
    finally:
        if trainer is not None and trainer.heartbeat is not None:
            trainer.heartbeat.stop()
    distributed.teardown(barrier=True)
    return result
