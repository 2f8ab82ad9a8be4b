"""Gradient communication (the wire side): schemes as DDP communication hooks, their byte
accounting, and (with the compression issue) compressors, wire formats and collectives."""

from dqt.comm.meter import CommMeter, wire_bytes
from dqt.comm.scheme import SCHEMES, Scheme, build_scheme

__all__ = ["CommMeter", "SCHEMES", "Scheme", "build_scheme", "wire_bytes"]
