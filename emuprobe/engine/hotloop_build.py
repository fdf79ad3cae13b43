"""cffi builder for emuprobe._hotloop (hotloop.c and exec/hostsse.c, exec/machine.c), run by
`pip install` (setup.py).

Also runnable by hand to build the module in place for a source checkout:
    python emuprobe/engine/hotloop_build.py
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

EXEC = HERE.parent / "exec"
ffibuilder = FFI()
ffibuilder.cdef((EXEC / "machine.h").read_text())
ffibuilder.cdef(
    """
    int hot_bind(int tid, int aspace);
    void hot_unbind(int tid);
    int hot_add_site(int aspace, uint64_t addr, int op, int len, int src, int dst,
                     uint64_t target, int counter, int base, int64_t disp, int size,
                     const char *code);
    int hot_add_range(int aspace, uint64_t lo, uint64_t hi, int writable);
    void hot_forget(int aspace);
    void hot_drop_site(int aspace, uint64_t addr);
    int hot_wait(int *tid, int *status, uint64_t *counters);
    int host_sse(const uint8_t *code, int len, uint8_t *fx);

    void hot_use_machine(struct mach *m);
    int hot_add_unicorn(int aspace, uint64_t addr, int len, const char *code, int counter,
                        const struct mplan *plan, struct memctx *mem);
    """
)
SOURCES = (EXEC / "hostsse.c", EXEC / "machine.c", HERE / "hotloop.c")
ffibuilder.set_source(
    "emuprobe._hotloop",
    "\n".join(p.read_text() for p in SOURCES),
    include_dirs=[str(EXEC)],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp))
        shutil.copy(built, HERE.parent / built.name)
        print(HERE.parent / built.name)
