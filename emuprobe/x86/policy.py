"""What is never emulated, and why: data tables that decode.py consults.

Every refusal names its reason, because a refused site costs a native
single-step (stop the world, restore, step, re-plant) and the user deserves to
know why a probe is slow.  The rule of thumb: emulate only what Unicorn gets
exactly right from the state we transfer (GPRs, RIP, arithmetic flags, FS/GS
base, XMM0-15, MXCSR) and the memory we show it.  Anything that touches other
CPU or system state, or that Unicorn gets wrong, runs natively.
"""

from __future__ import annotations

from capstone import x86_const as csx

LOCK = "lock: atomicity (other threads run while we emulate)"
XCHG_MEMORY = "xchg with memory: implicitly locked"
VEX256 = "VEX.256/EVEX: rejected by Unicorn (UC_ERR_INSN_INVALID)"
VEX128 = "VEX.128: zeroes YMM bits 255:128, which PTRACE_GETFPREGS cannot see or restore"
XOP = "XOP: AMD-only encoding"
X87 = "x87: FPU state is not transferred"
MMX = "MMX: MMX/x87 state is not transferred"
SEGMENT = "segment register access: segment state is not transferred"
FAR_BRANCH = "far branch: loads CS"
SSE_FP = (
    "SSE floating point (or SSE not on the verified list): Unicorn 2.1.4 never "
    "sets MXCSR exception flags and ignores unmasked exceptions"
)
UNKNOWN_REGISTER = "{reg}: a register the emulator does not transfer"
UNDECODABLE = "capstone cannot decode these bytes"
SEGMENT_PREFIXES = "several segment prefixes: the CPU and Unicorn disagree on which applies"
REP_PREFIXES = "both F2 and F3 prefixes"
BRANCH_66 = (
    "66-prefixed near branch: Intel ignores the prefix, Unicorn (like AMD) truncates RIP to 16 bits"
)
TRUNCATED = "instruction longer than the bytes given"

# Mnemonic (as capstone prints it) -> reason.
BY_MNEMONIC: dict[str, str] = {
    **dict.fromkeys(
        ("syscall", "sysenter", "sysexit", "sysret", "int", "int1", "int3", "into"),
        "{m}: side effects outside the CPU (kernel entry / signal)",
    ),
    **dict.fromkeys(("iret", "iretd", "iretq"), "{m}: loads system flags and CS/SS"),
    **dict.fromkeys(
        ("popf", "popfd", "popfq", "pushf", "pushfd", "pushfq"),
        "{m}: system flags (TF, IF, AC) are not held by the emulator",
    ),
    "rdtsc": "rdtsc: reads host state the emulator does not model",
    "rdtscp": "rdtscp: reads host state the emulator does not model",
    "rdpmc": "rdpmc: reads host state the emulator does not model",
    "rdrand": "rdrand: Unicorn's random numbers are not the CPU's",
    "rdseed": "rdseed: Unicorn's random numbers are not the CPU's",
    "rdpid": "rdpid: reads host state (the CPU number)",
    "cpuid": "cpuid: Unicorn reports its own CPU, not this one",
    "xgetbv": "xgetbv: reads XCR0, which the emulator does not model",
    "xsetbv": "xsetbv: privileged",
    "hlt": "hlt: privileged",
    **dict.fromkeys(
        (
            "fxsave",
            "fxsave64",
            "fxrstor",
            "fxrstor64",
            "xsave",
            "xsave64",
            "xsaveopt",
            "xsaveopt64",
            "xsavec",
            "xsavec64",
            "xsaves",
            "xsaves64",
            "xrstor",
            "xrstor64",
            "xrstors",
            "xrstors64",
        ),
        "{m}: saves/restores x87/AVX state the emulator does not hold",
    ),
    **dict.fromkeys(
        ("wrfsbase", "wrgsbase", "rdfsbase", "rdgsbase"),
        "{m}: segment bases are written back only as a side channel",
    ),
    "cmpxchg16b": "cmpxchg16b: used only for atomics",
    "cmpxchg8b": "cmpxchg8b: used only for atomics",
    "bzhi": "bzhi: Unicorn gives a wrong result",
    "ldmxcsr": "ldmxcsr: MXCSR validity checks (#GP on reserved bits) not modelled",
    **dict.fromkeys(("ud0", "ud1", "ud2"), "{m}: raises #UD (SIGILL) by design"),
    "enter": "enter: capstone reports none of the registers it uses",
    "xlatb": "xlatb: capstone reports none of the registers it uses",
    **dict.fromkeys(("xbegin", "xend", "xabort", "xtest"), "{m}: transactional memory state"),
    **dict.fromkeys(("rdpkru", "wrpkru"), "{m}: PKRU is not transferred"),
    **dict.fromkeys(
        (
            "rdsspd",
            "rdsspq",
            "incsspd",
            "incsspq",
            "saveprevssp",
            "rstorssp",
            "wrssd",
            "wrssq",
            "wrussd",
            "wrussq",
            "setssbsy",
            "clrssbsy",
        ),
        "{m}: shadow-stack state is not transferred",
    ),
    **dict.fromkeys(
        ("monitor", "mwait", "umonitor", "umwait", "tpause", "monitorx", "mwaitx"),
        "{m}: waits on host state",
    ),
    **dict.fromkeys(
        ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"), "{m}: port I/O"
    ),
    **dict.fromkeys(("ljmp", "lcall", "retf", "retfq"), FAR_BRANCH),
    **dict.fromkeys(("lss", "lfs", "lgs"), SEGMENT),
    **dict.fromkeys(("enqcmd", "enqcmds", "movdir64b", "movdiri"), "{m}: device stores"),
    **dict.fromkeys(
        (
            "rdmsr",
            "wrmsr",
            "sgdt",
            "sidt",
            "sldt",
            "smsw",
            "str",
            "lgdt",
            "lidt",
            "lldt",
            "lmsw",
            "ltr",
            "invd",
            "wbinvd",
            "wbnoinvd",
            "invlpg",
            "invpcid",
            "clts",
            "cli",
            "sti",
            "swapgs",
            "rsm",
            "verr",
            "verw",
            "lar",
            "lsl",
            "getsec",
            "rdsspq",
        ),
        "{m}: privileged or descriptor-table state (UMIP/#GP natively)",
    ),
    **dict.fromkeys(("adcx", "adox"), "{m}: Unicorn 2.1.4 raises #UD"),
    **dict.fromkeys(
        ("vzeroupper", "vzeroall"), "{m}: zeroes YMM bits 255:128, which are not transferred"
    ),
    "ptwrite": "ptwrite: writes to the processor trace",
    **dict.fromkeys(
        ("vmread", "vmwrite", "vmcall", "vmlaunch", "vmresume", "vmxoff", "vmxon", "vmclear",
         "vmptrld", "vmptrst", "vmfunc", "invept", "invvpid", "vmrun", "vmload", "vmsave",
         "vmmcall", "stgi", "clgi", "skinit", "invlpga"),
        "{m}: virtualisation instruction",
    ),
    "serialize": "serialize: serialising instruction",
    **dict.fromkeys(
        ("clflush", "clflushopt", "clwb", "cldemote"),
        "{m}: cache maintenance has effects on real memory only",
    ),
}

# capstone group -> reason (checked after BY_MNEMONIC).
BY_GROUP: dict[int, str] = {
    csx.X86_GRP_INT: "{m}: side effects outside the CPU (kernel entry / signal)",
    csx.X86_GRP_IRET: "{m}: loads system flags and CS/SS",
    csx.X86_GRP_PRIVILEGE: "{m}: privileged or system state",
    csx.X86_GRP_VM: "{m}: virtualisation instruction",
    csx.X86_GRP_SGX: "{m}: SGX",
    csx.X86_GRP_FPU: X87,
    csx.X86_GRP_MMX: MMX,
    csx.X86_GRP_3DNOW: MMX,
    csx.X86_GRP_RTM: "{m}: transactional memory state",
    csx.X86_GRP_HLE: "{m}: transactional memory state",
    csx.X86_GRP_XOP: XOP,
    csx.X86_GRP_FMA4: XOP,
    csx.X86_GRP_TBM: XOP,
    csx.X86_GRP_SSE4A: "{m}: AMD-only SSE4a",
}

# Legacy-SSE instructions that never raise SIMD floating-point exceptions and do
# not depend on MXCSR: data movement, logic, integer SIMD, shuffles, each checked
# against the CPU (tests/test_emulator.py enumerates their encodings).  Every
# other instruction with an XMM operand or an SSE group is refused with SSE_FP.
# Left out on purpose: phadd*/phsub* (QEMU 5 is wrong when source == destination).
SSE_SAFE: frozenset[str] = frozenset(
    """
    movaps movups movapd movupd movdqa movdqu lddqu movd movq movss movsd
    movhps movlps movhpd movlpd movhlps movlhps movntdq movntps movntpd movntdqa
    movmskps movmskpd pmovmskb
    andps andpd andnps andnpd orps orpd xorps xorpd
    pand pandn por pxor ptest
    paddb paddw paddd paddq paddsb paddsw paddusb paddusw
    psubb psubw psubd psubq psubsb psubsw psubusb psubusw
    pmullw pmulhw pmulhuw pmuludq pmulld pmuldq pmaddwd pmaddubsw pmulhrsw psadbw
    pavgb pavgw pabsb pabsw pabsd psignb psignw psignd
    pcmpeqb pcmpeqw pcmpeqd pcmpeqq pcmpgtb pcmpgtw pcmpgtd pcmpgtq
    pminub pminuw pminud pminsb pminsw pminsd pmaxub pmaxuw pmaxud pmaxsb pmaxsw pmaxsd
    psllw pslld psllq psrlw psrld psrlq psraw psrad pslldq psrldq
    punpcklbw punpcklwd punpckldq punpcklqdq punpckhbw punpckhwd punpckhdq punpckhqdq
    packsswb packssdw packuswb packusdw
    unpcklps unpcklpd unpckhps unpckhpd shufps shufpd
    pshufd pshufb pshuflw pshufhw palignr pblendw pblendvb blendps blendpd
    blendvps blendvpd
    pinsrb pinsrw pinsrd pinsrq pextrb pextrw pextrd pextrq insertps extractps
    pmovsxbw pmovsxbd pmovsxbq pmovsxwd pmovsxwq pmovsxdq
    pmovzxbw pmovzxbd pmovzxbq pmovzxwd pmovzxwq pmovzxdq
    phminposuw
    stmxcsr pause lfence sfence mfence prefetchnta prefetcht0 prefetcht1 prefetcht2
    prefetchw crc32 popcnt
    """.split()
)

# SSE/SSE2 floating point (baseline x86-64: never #UD) that Unicorn gets wrong
# (SSE_FP) but that, with XMM register operands only, the tracer's own CPU runs
# exactly: FastPath "sse" (hostsse.c).  With a memory operand they stay SSE_FP.
HOST_SSE: frozenset[str] = frozenset(
    """
    addss addsd addps addpd subss subsd subps subpd mulss mulsd mulps mulpd
    divss divsd divps divpd sqrtss sqrtsd sqrtps sqrtpd minss minsd minps minpd
    maxss maxsd maxps maxpd rcpss rcpps rsqrtss rsqrtps
    cvtss2sd cvtsd2ss cvtps2pd cvtpd2ps cvtdq2ps cvtps2dq cvttps2dq cvtdq2pd
    cvtpd2dq cvttpd2dq
    """.split()
)

# Legacy-SSE instructions whose 16-byte memory operand need not be aligned.  For
# the rest, a misaligned 16-byte access raises #GP natively, which QEMU 5 does
# not model: the machine refuses it (and the native step delivers SIGSEGV).
SSE_UNALIGNED_OK: frozenset[str] = frozenset("movups movupd movdqu lddqu".split())

SSE_GROUPS: frozenset[int] = frozenset(
    {
        csx.X86_GRP_SSE1,
        csx.X86_GRP_SSE2,
        csx.X86_GRP_SSE3,
        csx.X86_GRP_SSSE3,
        csx.X86_GRP_SSE41,
        csx.X86_GRP_SSE42,
        csx.X86_GRP_AES,
        csx.X86_GRP_PCLMUL,
        csx.X86_GRP_SHA,
    }
)

STRING_OPS: frozenset[str] = frozenset(
    """
    movsb movsw movsd movsq stosb stosw stosd stosq lodsb lodsw lodsd lodsq
    scasb scasw scasd scasq cmpsb cmpsw cmpsd cmpsq insb insw insd outsb outsw outsd
    """.split()
)

# A rep-prefixed string op is emulated to completion in one emu_start; beyond
# this many iterations the native step is faster than a Python hook per store.
REP_LIMIT = 4096
