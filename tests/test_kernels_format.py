"""dqt.kernels.blockq.format is the one source of the integers the kernels name — table
columns, kind / scale-format / decode-mode codes, scale bit patterns: the C kernel's enums are
the -D flags built from it, the Triton kernels' constexpr globals are its values, and neither
kernel spells one of them as a number. A code changed in one place only fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from dqt.kernels.blockq import cpu, format as fmt
from dqt.kernels.blockq.format import CODES, KERNEL_CONSTANTS, BlockSpec

PKG = Path(fmt.__file__).parent


def _c_enums(source: str) -> dict[str, str]:
    """NAME -> value expression of every ``enum { ... }`` in C source (comments removed)."""
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    out = {}
    for body in re.findall(r"\benum\s*\{(.*?)\}", source, flags=re.S):
        for item in body.split(","):
            if item.strip():
                name, _, value = (s.strip() for s in item.partition("="))
                out[name] = value
    return out


def _defines(flags: list[str]) -> dict[str, int]:
    """-DNAME=value flags → {NAME: value}."""
    found = (re.fullmatch(r"-D(\w+)=(-?\d+)", f) for f in flags)
    return {m.group(1): int(m.group(2)) for m in found if m}


def test_the_table_is_consistent():
    assert fmt.KINDS == tuple(CODES["kind"]) and fmt.MODES == tuple(CODES["mode"])
    assert set(fmt.SCALES) == set(CODES["scale"])
    for group, codes in CODES.items():
        assert len(set(codes.values())) == len(codes), group  # distinct within a group
    assert fmt.COLUMN_NAMES == ("DATA", "RES", "LEN", "MSG", "SCALE", "CODE", "CTR")
    assert [getattr(fmt, c) for c in fmt.COLUMN_NAMES] == list(range(len(fmt.COLUMN_NAMES)))
    assert fmt.COLUMNS > len(fmt.COLUMN_NAMES)
    for group, codes in CODES.items():
        for name, value in codes.items():
            assert KERNEL_CONSTANTS[f"{group}_{name}".upper()] == value


def test_c_enums_are_the_format_table():
    """Every enum constant of cpu.c is the -D flag of its name, those flags carry the table's
    values and are part of the hashed build flags; no enum entry is missing or extra."""
    enums = _c_enums((PKG / "cpu.c").read_text())
    assert set(enums) == set(KERNEL_CONSTANTS), set(enums) ^ set(KERNEL_CONSTANTS)
    for name, value in enums.items():
        assert value == f"DQT_{name}", f"cpu.c: {name} = {value}, not the -D flag DQT_{name}"
    defines = _defines(cpu.defines())
    assert {f"DQT_{k}": v for k, v in KERNEL_CONSTANTS.items()} == defines
    assert {name: defines[value] for name, value in enums.items()} == KERNEL_CONSTANTS
    assert set(cpu.defines()) <= set(cpu.flags())


def test_c_flags_follow_the_table(monkeypatch):
    """Change a code in format.py and the C build's flags (hence its cache name) change."""
    before = cpu.flags()
    shifted = {k: v + 100 for k, v in KERNEL_CONSTANTS.items()}
    monkeypatch.setattr(cpu, "KERNEL_CONSTANTS", shifted)
    assert _defines(cpu.defines()) == {f"DQT_{k}": v for k, v in shifted.items()}
    assert cpu.flags() != before


def test_c_spec_codes_come_from_the_table():
    for kind, scale, bits, levels in [("sign_mean", "fp32", 1, 0), ("sign", "none", 1, 0),
                                      ("ternary", "bf16", 2, 0), ("qsgd", "e8m0", 4, 3),
                                      ("sign_two", "e8m0", 1, 0)]:
        s = cpu._spec(BlockSpec(kind, 64, bits, scale, levels=levels))
        assert (s.kind, s.scale_fmt) == (CODES["kind"][kind], CODES["scale"][scale])


def test_triton_constants_are_the_format_table(monkeypatch):
    """triton_common defines each constant of the table as a tl.constexpr of its value, and
    nothing else as one — taken from the table (a shifted table shifts them all)."""
    pytest.importorskip("triton")
    import triton.language as tl

    from dqt.kernels.blockq import triton_common

    consts = {k: v.value for k, v in vars(triton_common).items() if isinstance(v, tl.constexpr)}
    assert consts == KERNEL_CONSTANTS

    shifted = {k: v + 100 for k, v in KERNEL_CONSTANTS.items()}
    monkeypatch.setattr(fmt, "KERNEL_CONSTANTS", shifted)
    spec = importlib.util.spec_from_file_location("_triton_common_shifted",
                                                  PKG / "triton_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert {k: getattr(mod, k).value for k in shifted} == shifted


def test_kernels_spell_no_code_or_column_as_a_number():
    """No comparison of a kind / scale format / mode with a number, no table column read at a
    numeric offset, in the Triton kernels or the C kernel."""
    triton_src = "\n".join((PKG / f).read_text() for f in ("triton_encode.py", "triton_decode.py"))
    assert not re.findall(r"\b(?:KIND|SCALE_FMT|MODE)\s*(?:[=!<>]=|[<>])\s*\d", triton_src)
    assert not re.findall(r"\brow\s*\+\s*\d", triton_src)
    assert not re.findall(r"tab_ptr\s*\+\s*\w+\s*\*\s*\d", triton_src)
    c_src = (PKG / "cpu.c").read_text()
    assert not re.findall(r"(?:->kind|scale_fmt|\bmode)\s*(?:[=!<>]=|[<>])\s*\d", c_src)
    assert not re.findall(r"\bcase\s+\d", c_src)
    assert not re.findall(r"\brow\[\s*\d", c_src)
