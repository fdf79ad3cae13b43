"""The capstone decoders every layer shares (x86-64): CS with detail, and
SWEEP, which skips data, for linear sweeps over a function's bytes.

Capstone objects hold a decode buffer and options; these serve the ELF
reader, the decoder, the class key, the XOL preparer and the difftest, which
all run in the tracer's one thread.
"""

from __future__ import annotations

import capstone

CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
CS.detail = True
SWEEP = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
SWEEP.skipdata = True  # like objdump: go on past bytes that decode to nothing


def decode(code: bytes, addr: int) -> capstone.CsInsn | None:
    """The instruction at the start of `code` (up to 16 bytes) as if at `addr`."""
    return next(CS.disasm(bytes(code[:16]), addr, 1), None)


def text_of(code: bytes, addr: int) -> tuple[str, str] | None:
    """(mnemonic, operands) of the first instruction, without detail (cheap)."""
    for _a, _s, mnemonic, op_str in CS.disasm_lite(bytes(code[:16]), addr, 1):
        return mnemonic, op_str
    return None
