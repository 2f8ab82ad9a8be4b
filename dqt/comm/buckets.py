"""Bucket compositions that survive a restart, so a resume is exact with any number of buckets.

DDP puts every gradient into one bucket on a process's first backward and rebuilds its buckets
after it, in the order the gradients became ready. A compressed exchange depends on which
parameters share a bucket (the chunks each rank owns, the server residuals, the Philox keys),
so a resumed process's first step — one bucket — would differ from the uninterrupted run's step
at that point, which used the rebuilt buckets.

:class:`BucketGroups` records the composition of the buckets the hook sees (the flat offsets of
their parameters, in bucket order); the scheme saves it with its state. After a restart, a
bucket that is not one of the saved compositions but holds whole saved ones (DDP's first step)
is processed as those saved buckets, one after another, each through a :class:`SubBucket`: a
buffer laid out exactly as DDP's bucket of those parameters was. The result is bitwise the
uninterrupted run's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("dqt")


class SubBucket:
    """Some parameters of a DDP bucket as a bucket of their own (the methods of
    ``torch.distributed.GradBucket`` the scheme uses): their gradients copied, in the given
    order, into one contiguous buffer; :meth:`write_back` copies a result into the gradients."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self._params, self._src = params, grads
        self._buf = torch.cat([g.reshape(-1) for g in grads])
        self._offsets, off = [], 0
        for g in grads:
            self._offsets.append(off)
            off += g.numel()
        self._grads = [self._buf[o:o + g.numel()].view_as(g) for o, g in zip(self._offsets, grads)]

    def buffer(self) -> torch.Tensor:
        return self._buf

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        return self._grads

    def write_back(self, out: torch.Tensor) -> None:
        for src, o in zip(self._src, self._offsets):
            src.copy_(out[o:o + src.numel()].view_as(src))


class BucketGroups:
    """The bucket compositions of the current step (to save) and of a checkpoint (to follow)."""

    def __init__(self) -> None:
        self._seen: dict[int, list[int]] = {}
        self._saved: list[list[int]] | None = None
        self._saved_keys: set[tuple[int, ...]] = set()
        self._warned = False

    def observe(self, index: int, flats: list[int]) -> None:
        """DDP's bucket ``index`` holds the parameters at flat offsets ``flats`` (bucket
        order). Bucket 0 starts a step."""
        if index == 0:
            self._seen = {}
        self._seen[index] = list(flats)
        if self._saved is not None and tuple(sorted(flats)) in self._saved_keys:
            self._saved = None  # DDP has rebuilt the saved buckets: nothing to follow any more

    def split(self, flats: list[int]) -> list[list[int]] | None:
        """The saved compositions to process a bucket holding ``flats`` as, in their saved
        order, or None to process it as it is (nothing saved, or it is a saved bucket)."""
        if self._saved is None or tuple(sorted(flats)) in self._saved_keys:
            return None
        inside = set(flats)
        groups = [g for g in self._saved if inside.intersection(g)]
        if not all(inside.issuperset(g) for g in groups) or sum(map(len, groups)) != len(flats):
            if not self._warned:
                log.warning("the gradient buckets differ from the checkpoint's in a way that "
                            "cannot be followed; this step is not bitwise the uninterrupted run's")
                self._warned = True
            return None
        self._seen = dict(enumerate(groups))  # what a checkpoint of this step must record
        return groups

    def state_dict(self) -> list[list[int]]:
        return [self._seen[i] for i in sorted(self._seen)]

    def load_state_dict(self, groups: Any) -> None:
        groups = [list(map(int, g)) for g in groups or []]
        self._saved = groups if len(groups) > 1 else None  # one bucket: nothing to follow
        self._saved_keys = {tuple(sorted(g)) for g in groups}
