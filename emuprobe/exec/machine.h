/* machine.c's interface, shared with cffi: hotloop_build.py gives this file
 * to cdef() as it is, so it holds declarations only, no preprocessor lines.
 * Include <stdint.h> and <stddef.h> first. */

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
    /* constants, from the binding */
    int hook_mem_unmapped, hook_mem_read, hook_mem_write, hook_intr, hook_insn_invalid;
    int hook_insn, ins_syscall, mem_fetch_unmapped, prot_all;
    int ctl_remove_cache, ctl_flush_tb; /* encoded uc_ctl codes */
};

/* How one memory operand's address is formed (addresses.MemRef); register
 * fields are byte offsets into user_regs_struct, -1 for none, -2 for RIP. */
struct mref {
    int32_t base, index, seg, bitreg;
    int64_t disp;
    int32_t scale, bitsize, a32;
};

/* A UnicornStep, flattened by machine.py once per plan. */
struct mplan {
    int32_t length, nregs, rip_i, eflags_i;
    int32_t uc_ids[32];
    int32_t offs[32]; /* user_regs_struct offsets, matching uc_ids */
    int32_t nxmm;
    int32_t xmm_uc[17]; /* XMM ids, then MXCSR */
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
