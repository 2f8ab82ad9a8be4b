"""Read the records of an offline W&B run file (``run-<id>.wandb``) without a network.

Format (W&B's LevelDB-style log): a 7-byte header ``b":W&B"`` + magic 0xBEE1 (LE) + version
byte, then 32 KiB blocks of records, each ``crc32c(4) | length(2, LE) | type(1) | data``, type
1 = full, 2/3/4 = first/middle/last fragment; a block tail of < 7 bytes is zero padding.
Each record's data is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from typing import Any

BLOCK = 32 * 1024


def records(path: str) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1, "not a .wandb file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pending = data
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + data
            continue
        elif kind == 4:
            pending += data
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def config_and_history(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                            for i in rec.history.item})
    return config, history
