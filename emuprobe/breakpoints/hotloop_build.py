"""cffi builder for emuprobe._hotloop (hotloop.c and emulator/hostsse.c), run by
`pip install` (setup.py).

Also runnable by hand to build the module in place for a source checkout:
    python emuprobe/breakpoints/hotloop_build.py
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int hot_bind(int tid, int aspace);
    void hot_unbind(int tid);
    int hot_add_site(int aspace, uint64_t addr, int op, int len, int src, int dst,
                     uint64_t target, int counter, int base, int64_t disp, int size,
                     const char *code);
    int hot_add_range(int aspace, uint64_t lo, uint64_t hi, int writable);
    void hot_forget(int aspace);
    int hot_wait(int *tid, int *status, uint64_t *counters);
    int host_sse(const uint8_t *code, int len, uint8_t *fx);

    typedef void uc_engine;
    typedef size_t uc_hook;
    struct uc_api {
        int (*reg_write_batch)(uc_engine *, int const *, void *const *, int);
        int (*reg_read_batch)(uc_engine *, int const *, void **, int);
        int (*emu_start)(uc_engine *, uint64_t, uint64_t, uint64_t, size_t);
        int (*emu_stop)(uc_engine *);
        int (*mem_map_ptr)(uc_engine *, uint64_t, size_t, uint32_t, void *);
        int (*mem_unmap)(uc_engine *, uint64_t, size_t);
        int (*hook_add)(uc_engine *, uc_hook *, int, void *, void *, uint64_t, uint64_t, ...);
        int (*ctl)(uc_engine *, int, ...);
        const char *(*strerror)(int);
        int hook_mem_unmapped, hook_mem_read, hook_mem_write, hook_intr, hook_insn_invalid;
        int hook_insn, ins_syscall, mem_fetch_unmapped, prot_all;
        int ctl_remove_cache, ctl_flush_tb;
    };
    struct mref {
        int32_t base, index, seg, bitreg;
        int64_t disp;
        int32_t scale, bitsize, a32;
    };
    struct mplan {
        int32_t length, nregs, rip_i, eflags_i;
        int32_t uc_ids[32];
        int32_t offs[32];
        int32_t nxmm;
        int32_t xmm_uc[17];
        int32_t xmm_idx[16];
        int32_t needs_fp, branch, rep, aligned16;
        int32_t nrefs, nimplicit;
        struct mref refs[8];
        int32_t implicit[3];
        uint64_t emulated_flags, reserved_one;
    };
    struct mach;
    struct memctx;
    struct mach *mach_new(uc_engine *uc, const struct uc_api *api);
    struct memctx *memctx_new(int fd);
    void memctx_free(struct memctx *c);
    int memctx_set_maps(struct memctx *c, const uint64_t *starts, const uint64_t *ends,
                        const int32_t *prots, int n);
    int memctx_set_planted(struct memctx *c, const uint64_t *addrs, const uint8_t *bytes, int n);
    const char *mach_reason(struct mach *m);
    int mach_errno(struct mach *m);
    int mach_nstores(struct mach *m);
    int mach_store(struct mach *m, int i, uint64_t *addr, uint8_t *buf, int cap);
    int mach_run(struct mach *m, const struct mplan *p, const char *code, int code_len,
                 uint8_t *regs, uint8_t *fx, struct memctx *mem, int flags, int *fp_written);
    void hot_use_machine(struct mach *m);
    int hot_add_unicorn(int aspace, uint64_t addr, int len, const char *code, int counter,
                        const struct mplan *plan, struct memctx *mem);
    """
)
SOURCES = (
    HERE.parent / "emulator" / "hostsse.c",
    HERE.parent / "emulator" / "machine.c",
    HERE / "hotloop.c",
)
ffibuilder.set_source(
    "emuprobe._hotloop", "\n".join(p.read_text() for p in SOURCES), extra_compile_args=["-O2"]
)

if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp))
        shutil.copy(built, HERE.parent / built.name)
        print(HERE.parent / built.name)
