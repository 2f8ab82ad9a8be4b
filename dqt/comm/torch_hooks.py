"""PyTorch's own DDP communication hooks as baselines, with dqt's byte counting.

* ``allreduce`` (no ``+scheme``): ``default_hooks.allreduce_hook`` — fp32 sum / world size,
  the same result as DDP's built-in all-reduce;
* ``fp16`` / ``bf16``: ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook``;
* ``powersgd``: ``powerSGD_hook.powerSGD_hook`` (Vogels et al., NeurIPS 2019), whose per-rank
  state (error feedback, warm-started Q factors, iteration) is checkpointed per rank.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.meter import count_all_reduces
from dqt.comm.config import BF16Config, FP16Config, PowerSGDConfig
from dqt.comm.scheme import Scheme, register_scheme


class TorchHookScheme(Scheme):
    """Wraps a stock hook: records the raw fp32 equivalent; its all-reduces on the scheme's
    own group are counted wherever they are issued from."""

    serialize_on_gloo = False

    def __init__(self, name: str, hook: Any, process_group: dist.ProcessGroup | None) -> None:
        super().__init__(process_group)
        self.name = name
        self.hook = hook
        count_all_reduces(self.process_group, self.meter)
        self.serialize = (self.serialize_on_gloo
                          and dist.get_backend(self.process_group) == "gloo")

    def hook_state(self) -> Any:
        return self.process_group

    def attach(self, model: DistributedDataParallel) -> None:
        def counted(state, bucket):  # unannotated: DDP checks annotations by identity
            start = time.perf_counter()
            self.meter.record_raw(bucket.buffer().numel(), self.world_size)
            fut = self.hook(state, bucket)
            if self.serialize:
                fut.wait()
            self.meter.hook_s += time.perf_counter() - start
            return fut

        model.register_comm_hook(self.hook_state(), counted)


class PowerSGDScheme(TorchHookScheme):
    """PyTorch's PowerSGD issues its second all-reduce from a ``Future.then`` callback. On gloo
    those callbacks run on gloo's threads, so with several buckets in flight two ranks can issue
    the collectives in different orders and deadlock (PyTorch skips its own PowerSGD parity
    test on gloo, pytorch#58467). On gloo dqt therefore completes each bucket before DDP
    launches the next (correct, without communication/computation overlap)."""

    serialize_on_gloo = True

    def __init__(self, cfg: PowerSGDConfig, process_group: dist.ProcessGroup | None) -> None:
        super().__init__("powersgd", powerSGD_hook.powerSGD_hook, process_group)
        self.state = powerSGD_hook.PowerSGDState(
            process_group=self.process_group,
            matrix_approximation_rank=cfg.matrix_approximation_rank,
            start_powerSGD_iter=cfg.start_powerSGD_iter,
            min_compression_rate=cfg.min_compression_rate,
            use_error_feedback=cfg.use_error_feedback,
            warm_start=cfg.warm_start,
            orthogonalization_epsilon=cfg.orthogonalization_epsilon,
            random_seed=0,
        )

    def hook_state(self) -> Any:
        return self.state

    def state_dict(self) -> dict[str, Any]:
        return {"powersgd": self.state.__getstate__()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.__setstate__(state["powersgd"])
        self.state.process_group = self.process_group


@register_scheme(type(None))
def _allreduce(cfg: Any, pg: dist.ProcessGroup | None) -> Scheme:
    return TorchHookScheme("allreduce", default_hooks.allreduce_hook, pg)


@register_scheme(FP16Config)
def _fp16(cfg: Any, pg: dist.ProcessGroup | None) -> Scheme:
    return TorchHookScheme("fp16", default_hooks.fp16_compress_hook, pg)


@register_scheme(BF16Config)
def _bf16(cfg: Any, pg: dist.ProcessGroup | None) -> Scheme:
    return TorchHookScheme("bf16", default_hooks.bf16_compress_hook, pg)


@register_scheme(PowerSGDConfig)
def _powersgd(cfg: Any, pg: dist.ProcessGroup | None) -> Scheme:
    return PowerSGDScheme(cfg, pg)
