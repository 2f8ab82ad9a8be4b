"""Error-feedback residuals in flat fp32 buffers in parameter order (``docs/design.md``, invariant 3).

DDP re-buckets parameters after the first iteration, so state keyed by bucket index (as in
PyTorch's PowerSGD) silently breaks. dqt keeps one flat buffer the size of all trainable
parameters, laid out in ``model.parameters()`` order; every block of a bucket layout
(:mod:`dqt.comm.layout`) carries its offset in that buffer, and the kernels read and write the
residual there in the same pass that quantizes — whatever the bucket layout.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): with compressor C,
``v = g + e;  sent = C(v);  e' = v − sent``, hence Σ sent_t + e_T = Σ g_t + e_0 (telescoping).
Residuals are stored *unscaled*: with a GradScaler scale S the hook sees S·g, uses v = S·g + S·e
and stores (v − sent)/S, so a change of S between steps does not corrupt the state. A block
holding inf/NaN leaves its residual untouched (the step is skipped by GradScaler).
"""

from __future__ import annotations

import torch


class FlatResidual:
    """A flat fp32 buffer over all trainable parameters, with each parameter's offset."""

    def __init__(self, params: list[torch.Tensor], allocate: bool = True) -> None:
        self.offsets: dict[int, int] = {}
        total = 0
        for p in params:
            self.offsets[p.data_ptr()] = total
            total += p.numel()
        self.numel = total
        device = params[0].device if params else torch.device("cpu")
        self.buffer = torch.zeros(total if allocate else 0, dtype=torch.float32, device=device)

    def offset(self, param: torch.Tensor) -> int:
        return self.offsets[param.data_ptr()]

    def state_dict(self) -> torch.Tensor:
        return self.buffer.clone()

    def load_state_dict(self, state: torch.Tensor) -> None:
        if state.shape != self.buffer.shape:
            raise ValueError(f"error-feedback state has {state.numel()} elements but the model "
                             f"has {self.buffer.numel()} trainable parameters")
        self.buffer.copy_(state)
