"""Error-feedback residuals in flat fp32 buffers in parameter order (DESIGN invariant 3).

DDP re-buckets parameters after the first iteration, so state keyed by bucket index (as in
PyTorch's PowerSGD) silently breaks. dqt keeps one flat buffer the size of all trainable
parameters, laid out in ``model.parameters()`` order, and maps each bucket onto it through the
bucket's parameters: ``bucket.buffer()`` is the concatenation of ``bucket.parameters()``'s
gradients, so ``residual[index(bucket)]`` is the bucket's slice whatever the bucket layout.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): with compressor C,
``v = g + e;  sent = C(v);  e' = v − sent``, hence Σ sent_t + e_T = Σ g_t + e_0 (telescoping).
Residuals are stored *unscaled*: with a GradScaler scale S the hook sees S·g, adds S·e and
stores (v − sent)/S, so a change of S between steps does not corrupt the state.
"""

from __future__ import annotations

import torch


class FlatResidual:
    """A flat fp32 buffer over all trainable parameters, plus the bucket → flat index maps.
    ``allocate=False`` keeps only the index maps (schemes without error feedback use them to
    put a bucket into canonical parameter order)."""

    def __init__(self, params: list[torch.Tensor], allocate: bool = True) -> None:
        self.offsets: dict[int, tuple[int, int]] = {}
        total = 0
        for p in params:
            self.offsets[p.data_ptr()] = (total, p.numel())
            total += p.numel()
        device = params[0].device if params else torch.device("cpu")
        self.buffer = torch.zeros(total if allocate else 0, dtype=torch.float32, device=device)
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._order_cache: dict[tuple[int, ...], torch.Tensor | None] = {}
        self._canonical_index: dict[tuple[int, ...], torch.Tensor] = {}

    def index(self, bucket_params: list[torch.Tensor]) -> torch.Tensor:
        """Positions in the flat buffer of a bucket's elements, in bucket order (cached)."""
        key = tuple(p.data_ptr() for p in bucket_params)
        idx = self._index_cache.get(key)
        if idx is None:
            parts = []
            for p in bucket_params:
                off, n = self.offsets[p.data_ptr()]
                parts.append(torch.arange(off, off + n, device=self.buffer.device))
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            self._index_cache[key] = idx
        return idx

    def canonical(self, bucket_params: list[torch.Tensor]
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(permutation into parameter order or None, flat positions in that order) — both
        cached per bucket layout, so the hot path does no index arithmetic."""
        order = self.canonical_order(bucket_params)
        key = tuple(p.data_ptr() for p in bucket_params)
        if key not in self._canonical_index:
            idx = self.index(bucket_params)
            self._canonical_index[key] = idx if order is None else idx.index_select(0, order)
        return order, self._canonical_index[key]

    def canonical_order(self, bucket_params: list[torch.Tensor]) -> torch.Tensor | None:
        """Permutation of a bucket's elements into parameter order (None if already so).

        DDP orders a bucket's parameters by gradient-ready order after its first iteration,
        and by reverse registration order before it — so a resumed process's first step sees
        another layout than the uninterrupted run. Compressing in parameter order makes chunk
        ownership and scale blocks independent of that (and of ``bucket_cap_mb`` ordering)."""
        key = tuple(p.data_ptr() for p in bucket_params)
        if key not in self._order_cache:
            idx = self.index(bucket_params)
            order = torch.argsort(idx)
            identity = bool(torch.equal(order, torch.arange(idx.numel(), device=idx.device)))
            self._order_cache[key] = None if identity else order
        return self._order_cache[key]

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        return self.buffer.index_select(0, idx)

    def put(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.buffer.index_copy_(0, idx, values)

    def state_dict(self) -> torch.Tensor:
        return self.buffer.clone()

    def load_state_dict(self, state: torch.Tensor) -> None:
        if state.shape != self.buffer.shape:
            raise ValueError(f"error-feedback state has {state.numel()} elements but the model "
                             f"has {self.buffer.numel()} trainable parameters")
        self.buffer.copy_(state)
