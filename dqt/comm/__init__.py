"""Gradient communication (the wire side): schemes as DDP communication hooks, their byte
accounting, compressors, bucket layouts and the compressed collectives. Importing this package
registers every scheme (``SCHEMES``)."""

from dqt.comm import compressed_scheme, torch_hooks  # noqa: F401  (register the schemes)
from dqt.comm.meter import CommMeter, wire_bytes
from dqt.comm.scheme import SCHEMES, Scheme, build_scheme, scheme_names

__all__ = ["CommMeter", "SCHEMES", "Scheme", "build_scheme", "scheme_names", "wire_bytes"]
