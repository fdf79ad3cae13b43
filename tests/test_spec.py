"""The PROBE parser, from a table of strings (as bcc's trace.py is tested)."""

from __future__ import annotations

import pytest

from emuprobe.errors import ProbeError
from emuprobe.spec.probe import parse_probe

GOOD = [
    # text, name, binary, symbol, offset, address
    ("main", "main", None, "main", 0, None),
    ("main+4", "main+4", None, "main", 4, None),
    ("main+0x10", "main+16", None, "main", 16, None),
    ("libc:malloc", "malloc", "libc", "malloc", 0, None),
    ("libm.so.6:cos", "cos", "libm.so.6", "cos", 0, None),
    ("/usr/bin/ls:main+8", "main+8", "/usr/bin/ls", "main", 8, None),
    ("./app:0x401136", "0x401136", "./app", None, 0, 0x401136),
    ("entry=work", "entry", None, "work", 0, None),
    ("a=libc:free", "a", "libc", "free", 0, None),
    ("x.y=./app:0x10", "x.y", "./app", None, 0, 0x10),
    ("_ZN3foo3barEv", "_ZN3foo3barEv", None, "_ZN3foo3barEv", 0, None),
    ("libc:malloc@@GLIBC_2.2.5", "malloc@@GLIBC_2.2.5", "libc", "malloc@@GLIBC_2.2.5", 0, None),
]


@pytest.mark.parametrize("text,name,binary,symbol,offset,address", GOOD)
def test_good(text, name, binary, symbol, offset, address):
    s = parse_probe(text)
    assert (s.text, s.name, s.binary, s.symbol, s.offset, s.address) == (
        text, name, binary, symbol, offset, address,
    )


BAD = [
    # text, column the error must point at, words the message must contain
    ("", 1, "empty"),
    (" main", 1, "spaces"),
    ("main+", 6, "offset"),
    ("main+zz", 6, "offset 'zz'"),
    ("0x401136", 1, "needs a BINARY"),
    (":main", 1, "empty BINARY"),
    ("libc:", 6, "missing SYMBOL"),
    ("1bad=main", 1, "event name"),
    ("ma-in", 3, "not a symbol"),
    ("./app:0x40zz", 7, "address"),
]


@pytest.mark.parametrize("text,column,words", BAD)
def test_bad(text, column, words):
    with pytest.raises(ProbeError) as err:
        parse_probe(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{text}'" in msg
    assert f"column {column}:" in msg
    assert words in msg
