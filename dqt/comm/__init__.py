"""Gradient communication (the wire side): schemes as DDP communication hooks, their byte
accounting, compressors, bucket layouts and the compressed collectives. Importing this package
registers every scheme (``SCHEMES``).

The public surface (``docs/library.md``)::

    import dqt.comm as comm
    handle = comm.compress(ddp_model, comm.TernaryGrad())    # or a preset name: "ternary_grad"

* :func:`compress` — attach a scheme to a ``DistributedDataParallel`` model (returns the
  :class:`Scheme` handle: ``state_dict``/``load_state_dict`` per rank, ``stats``,
  ``set_grad_scale``) or to a ``fully_shard`` (FSDP2) model's reduce-scatter (returns an
  :class:`FSDPCompression`, which also gives its state for ``torch.distributed.checkpoint``).
* The scheme configs, one class per scheme, defaults = the shipped presets: :class:`OneBit`,
  :class:`EFSignSGD`, :class:`SignSGD`, :class:`TernaryGrad`, :class:`QSGD`, :class:`FP8`
  (dqt's codecs),
  :class:`PowerSGD`, :class:`BF16`, :class:`FP16` (PyTorch's hooks, counted).
* :func:`preset` / :func:`presets` — the shipped presets by name.
* :class:`OneBitAdam` — 1-bit Adam over any dqt codec (the optimizer communicates).
"""

from dqt.comm import compressed_scheme, torch_hooks  # noqa: F401  (register the schemes)
from dqt.comm.api import attached, compress, preset, presets
from dqt.comm.config import BF16Config as BF16
from dqt.comm.config import EFSignSGDConfig as EFSignSGD
from dqt.comm.config import FP8Config as FP8
from dqt.comm.config import FP16Config as FP16
from dqt.comm.config import OneBitConfig as OneBit
from dqt.comm.config import PowerSGDConfig as PowerSGD
from dqt.comm.config import QSGDConfig as QSGD
from dqt.comm.config import SignSGDConfig as SignSGD
from dqt.comm.config import TernaryGradConfig as TernaryGrad
from dqt.comm.fsdp import FSDPCompression
from dqt.comm.meter import CommMeter, wire_bytes
from dqt.comm.onebit_adam import OneBitAdam
from dqt.comm.scheme import SCHEMES, Scheme, build_scheme, scheme_names

__all__ = ["BF16", "CommMeter", "EFSignSGD", "FP8", "FP16",
           "FSDPCompression", "OneBit", "OneBitAdam", "PowerSGD", "QSGD",
           "SCHEMES", "Scheme", "SignSGD", "TernaryGrad", "attached", "build_scheme", "compress",
           "preset", "presets", "scheme_names", "wire_bytes"]
