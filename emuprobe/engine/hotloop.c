/* The compiled hot loop: waitpid and the commonest probe hits, without Python.
 *
 * Why: a counting probe's hit is four or five syscalls (waitpid, GETREGS,
 * [GETSIGINFO], [POKEDATA], SETREGS, CONT).  From Python ctypes the bare loop
 * already costs 1.9x the same loop in C (benchmarks/, ARCHITECTURE.md), so the
 * engine cannot reach its per-hit target in Python at all.
 *
 * What: hot_wait() reaps stops; a plain SIGTRAP stop of a thread bound to an
 * address space, at a site registered in it, is handled here and counted, and
 * the loop goes on.  Anything else (another stop, an unknown thread or site,
 * a memory access outside the ranges known to allow it, any failure) is returned
 * to Python untouched, which handles it as if this loop did not exist.
 * Python registers only sites whose FastPath it has just executed itself, and
 * only for probes without handlers, so the semantics are FastPath's:
 * session.py and exec/fastpath.py stay the reference.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#define HOT_NOP 0
#define HOT_PUSH 1
#define HOT_MOV 2
#define HOT_JMP 3
#define HOT_CALL 4
#define HOT_LOAD 5  /* mov r, [base+disp] */
#define HOT_STORE 6 /* mov [base+disp], r */
#define HOT_SSE 7   /* register-only SSE arithmetic, run on our CPU (exec/hostsse.c) */
#define HOT_UNICORN 8 /* a UnicornStep, run by the compiled machine (exec/machine.c) */
#define BASE_RIP 0xffff

#define TID_SLOTS 4096 /* open addressing, power of two */
#define SITE_SLOTS 8192
#define MAX_RANGES 64
#define AC_FLAG 0x40000UL
#define TF_FLAG 0x100UL /* the program single-steps itself: Python delivers its trap */
#define SI_KERNEL_CODE 0x80

struct hot_site {
    uint64_t addr; /* 0: empty */
    int32_t aspace;
    int32_t counter;
    uint8_t op, len;
    uint16_t src, dst; /* byte offsets into user_regs_struct */
    uint64_t target;   /* jmp/call: the absolute target */
    int64_t disp;      /* load/store: address = base + disp */
    uint16_t base;     /* load/store: offset into user_regs_struct, or BASE_RIP (the next insn) */
    uint8_t size;      /* load/store: 4 or 8 bytes */
    uint8_t code[16];  /* the instruction as the site was made for it */
    const struct mplan *plan; /* unicorn: the flattened plan (owned by cmachine.py) */
    struct memctx *mem;       /* unicorn: the address space (owned by cmachine.py) */
};

int host_sse(const uint8_t *code, int len, uint8_t *fx); /* exec/hostsse.c */
static struct mach *machine; /* exec/machine.c, set by hot_use_machine */

static int32_t tid_key[TID_SLOTS];
static int32_t tid_val[TID_SLOTS];
static struct hot_site sites[SITE_SLOTS];
static int nsites;
static struct { int32_t aspace; int32_t writable; uint64_t lo, hi; } ranges[MAX_RANGES];
static int nranges;

static unsigned hash64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (unsigned)x;
}

/* Thread -> address-space binding; tid 0 marks an empty slot, -1 a deleted one. */
int hot_bind(int tid, int aspace)
{
    unsigned i = hash64((uint64_t)tid) & (TID_SLOTS - 1);
    int free_at = -1;
    for (int n = 0; n < TID_SLOTS; n++, i = (i + 1) & (TID_SLOTS - 1)) {
        if (tid_key[i] == tid) {
            tid_val[i] = aspace;
            return 0;
        }
        if (tid_key[i] == -1 && free_at < 0)
            free_at = (int)i;
        if (tid_key[i] == 0) {
            if (free_at < 0)
                free_at = (int)i;
            break;
        }
    }
    if (free_at < 0)
        return -1;
    tid_key[free_at] = tid;
    tid_val[free_at] = aspace;
    return 0;
}

static int lookup_tid(int tid)
{
    unsigned i = hash64((uint64_t)tid) & (TID_SLOTS - 1);
    for (int n = 0; n < TID_SLOTS; n++, i = (i + 1) & (TID_SLOTS - 1)) {
        if (tid_key[i] == tid)
            return tid_val[i];
        if (tid_key[i] == 0)
            return -1;
    }
    return -1;
}

void hot_unbind(int tid)
{
    unsigned i = hash64((uint64_t)tid) & (TID_SLOTS - 1);
    for (int n = 0; n < TID_SLOTS; n++, i = (i + 1) & (TID_SLOTS - 1)) {
        if (tid_key[i] == tid) {
            tid_key[i] = -1;
            return;
        }
        if (tid_key[i] == 0)
            return;
    }
}

static struct hot_site *find_site(int aspace, uint64_t addr, int insert)
{
    unsigned i = hash64(addr * 31 + (uint64_t)aspace) & (SITE_SLOTS - 1);
    for (int n = 0; n < SITE_SLOTS; n++, i = (i + 1) & (SITE_SLOTS - 1)) {
        struct hot_site *s = &sites[i];
        if (s->addr == addr && s->aspace == aspace)
            return s;
        if (s->addr == 0)
            return insert ? s : NULL;
    }
    return NULL;
}

int hot_add_site(int aspace, uint64_t addr, int op, int len, int src, int dst,
                 uint64_t target, int counter, int base, int64_t disp, int size,
                 const char *code)
{
    if (nsites >= SITE_SLOTS / 2)
        return -1; /* keep the table sparse; the rest stay on the Python path */
    struct hot_site *s = find_site(aspace, addr, 1);
    if (s == NULL)
        return -1;
    if (s->addr == 0)
        nsites++;
    s->addr = addr;
    s->aspace = aspace;
    s->op = (uint8_t)op;
    s->len = (uint8_t)len;
    s->src = (uint16_t)src;
    s->dst = (uint16_t)dst;
    s->target = target;
    s->counter = counter;
    s->base = (uint16_t)base;
    s->disp = disp;
    s->size = (uint8_t)size;
    memcpy(s->code, code, len < 16 ? (size_t)len : 16);
    s->plan = NULL;
    s->mem = NULL;
    return 0;
}

void hot_use_machine(struct mach *m)
{
    machine = m;
}

/* A UnicornStep site: run by mach_run() at every hit. */
int hot_add_unicorn(int aspace, uint64_t addr, int len, const char *code, int counter,
                    const struct mplan *plan, struct memctx *mem)
{
    if (machine == NULL)
        return -1;
    int rc = hot_add_site(aspace, addr, HOT_UNICORN, len, 0, 0, 0, counter, 0, 0, 0, code);
    if (rc == 0) {
        struct hot_site *s = find_site(aspace, addr, 0);
        s->plan = plan;
        s->mem = mem;
    }
    return rc;
}

/* [lo, hi) of `aspace` is a readable, non-executable mapping, also writable
 * if `writable` (Python checked it against /proc/PID/maps, as
 * fastpath.check_access does). */
int hot_add_range(int aspace, uint64_t lo, uint64_t hi, int writable)
{
    for (int i = 0; i < nranges; i++)
        if (ranges[i].aspace == aspace && ranges[i].lo == lo && ranges[i].hi == hi) {
            ranges[i].writable = writable;
            return 0;
        }
    if (nranges >= MAX_RANGES)
        return -1;
    ranges[nranges].aspace = aspace;
    ranges[nranges].writable = writable;
    ranges[nranges].lo = lo;
    ranges[nranges].hi = hi;
    nranges++;
    return 0;
}

/* Stop handling the site at `addr` of `aspace`: a probe that needs Python
 * (a handler) has joined it. */
void hot_drop_site(int aspace, uint64_t addr)
{
    struct hot_site *s = find_site(aspace, addr, 0);
    if (s != NULL)
        s->aspace = -1; /* a tombstone, as in hot_forget */
}

/* Forget everything about `aspace` (exec replaced it, or it is gone). */
void hot_forget(int aspace)
{
    for (int i = 0; i < SITE_SLOTS; i++)
        if (sites[i].addr && sites[i].aspace == aspace) {
            sites[i].aspace = -1; /* a tombstone: keeps probe chains intact */
        }
    for (int i = 0; i < nranges;)
        if (ranges[i].aspace == aspace)
            ranges[i] = ranges[--nranges];
        else
            i++;
}

/* [addr, addr+size) lies in one known range that allows the access. */
static int access_ok(int aspace, uint64_t addr, unsigned size, int write)
{
    for (int i = 0; i < nranges; i++)
        if (ranges[i].aspace == aspace && ranges[i].lo <= addr && addr + size <= ranges[i].hi &&
            addr + size > addr)
            return !write || ranges[i].writable;
    return 0;
}

/* Exactly `size` bytes, as the instruction moves them: PEEK/POKEDATA move 8,
 * and a read-modify-write of 8 for a 4-byte store could lose another thread's
 * store to the other 4.  process_vm_* also honour the page protections. */
static int vm_copy(pid_t tid, uint64_t addr, void *buf, unsigned size, int write)
{
    struct iovec local = {buf, size}, remote = {(void *)addr, size};
    ssize_t n = write ? process_vm_writev(tid, &local, 1, &remote, 1, 0)
                      : process_vm_readv(tid, &local, 1, &remote, 1, 0);
    return n == (ssize_t)size ? 0 : -1;
}

#define REG(r, off) (*(unsigned long long *)((char *)(r) + (off)))

/* Whether the bytes after our int3 are still the instruction the site was
 * made for.  A program that rewrote them (self-modifying or patched code)
 * is handed to Python, which analyses the new bytes.  One read per hit of
 * an instruction longer than its int3. */
static int code_unchanged(pid_t tid, const struct hot_site *s)
{
    /* PTRACE_PEEKTEXT a word at a time: one syscall for an instruction of
     * up to 9 bytes.  Measured at the C floor (benchmarks/fixtures/floor.c,
     * FLOOR_READBACK=1) it adds about 4 us to a 30 us hit on an Intel Xeon
     * VM; a 1-byte instruction (push %rbp) needs no check. */
    size_t n = s->len > 1 ? (size_t)s->len - 1 : 0;
    for (size_t off = 0; off < n; off += sizeof(long)) {
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)(uintptr_t)(s->addr + 1 + off), 0);
        if (errno)
            return 0; /* the word runs off the mapping: Python reads it exactly */
        size_t k = n - off < sizeof(long) ? n - off : sizeof(long);
        if (memcmp(&word, s->code + 1 + off, k) != 0)
            return 0;
    }
    return 1;
}

/* 0 if the hit was handled (the thread is running again), -1 to hand it to Python. */
static int handle(pid_t tid, uint64_t *counters)
{
    int aspace = lookup_tid(tid);
    if (aspace < 0)
        return -1;
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0)
        return -1;
    struct hot_site *s = find_site(aspace, r.rip - 1, 0);
    if (s == NULL || (r.eflags & (AC_FLAG | TF_FLAG)))
        return -1;
    if (s->len == 1) {
        /* at site+1 a SIGTRAP the program sent itself looks the same */
        siginfo_t si;
        if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0 || si.si_code != SI_KERNEL_CODE)
            return -1;
    }
    if (!code_unchanged(tid, s))
        return -1;
    uint64_t next = s->addr + s->len;
    switch (s->op) {
    case HOT_NOP:
        r.rip = next;
        break;
    case HOT_MOV:
        REG(&r, s->dst) = REG(&r, s->src);
        r.rip = next;
        break;
    case HOT_JMP:
        r.rip = s->target;
        break;
    case HOT_PUSH:
    case HOT_CALL: {
        uint64_t sp = r.rsp - 8;
        uint64_t value = s->op == HOT_PUSH ? REG(&r, s->src) : next; /* push rsp: old value */
        if (!access_ok(aspace, sp, 8, 1))
            return -1;
        if (ptrace(PTRACE_POKEDATA, tid, (void *)sp, (void *)value) < 0)
            return -1;
        r.rsp = sp;
        r.rip = s->op == HOT_PUSH ? next : s->target;
        break;
    }
    case HOT_LOAD:
    case HOT_STORE: {
        uint64_t base = s->base == BASE_RIP ? next : REG(&r, s->base);
        uint64_t at = base + (uint64_t)s->disp;
        int write = s->op == HOT_STORE;
        if (!access_ok(aspace, at, s->size, write))
            return -1;
        uint64_t value = write ? REG(&r, s->src) : 0; /* little-endian: low bytes first */
        if (vm_copy(tid, at, &value, s->size, write) < 0)
            return -1;
        if (!write)
            REG(&r, s->dst) = value; /* a 4-byte load zero-extends */
        r.rip = next;
        break;
    }
    case HOT_UNICORN: {
        struct user_fpregs_struct fp;
        int fp_written;
        if (s->plan->needs_fp && ptrace(PTRACE_GETFPREGS, tid, 0, &fp) < 0)
            return -1;
        r.rip = s->addr;
        int rc = mach_run(machine, s->plan, (const char *)s->code, s->len, (uint8_t *)&r,
                          s->plan->needs_fp ? (uint8_t *)&fp : NULL, s->mem, MF_NO_PYTHON,
                          &fp_written);
        if (rc != 0)
            return -1; /* refused, or Python's to decide: nothing changed */
        if (fp_written && ptrace(PTRACE_SETFPREGS, tid, 0, &fp) < 0)
            return -1;
        break; /* r.rip is where the instruction went */
    }
    case HOT_SSE: {
        struct user_fpregs_struct fp;
        if (ptrace(PTRACE_GETFPREGS, tid, 0, &fp) < 0)
            return -1;
        if (host_sse(s->code, s->len, (uint8_t *)&fp) < 0)
            return -1; /* nothing changed: Python refuses it the same way */
        if (ptrace(PTRACE_SETFPREGS, tid, 0, &fp) < 0)
            return -1;
        r.rip = next;
        break;
    }
    default:
        return -1;
    }
    /* after the store nothing may be handed back: finish or report failure */
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) < 0)
        return -1;
    counters[s->counter]++;
    /* The instruction has taken effect: from here on the hit is ours and is
     * never handed back (Python would see a thread past the site and take the
     * trap for the program's own).  CONT on a thread we hold stopped fails
     * only if it died meanwhile, and waitpid reports that. */
    (void)ptrace(PTRACE_CONT, tid, 0, 0);
    return 0;
}

/* Hits handled in C before control goes back to Python once.  Python's
 * SIGINT/SIGTERM handlers only run in the interpreter, and a signal that lands
 * while we are between syscalls interrupts nothing: without this, Ctrl-C would
 * wait for the tracee to stop hitting probes.  256 hits is a few milliseconds. */
#define HOT_YIELD_EVERY 256

/* Reap stops until one needs Python.  Returns 1 (with tid and status set), 0
 * (nothing for Python: a chance to run its signal handlers), or -errno (EINTR:
 * a signal for Python; ECHILD: nothing left to wait for). */
int hot_wait(int *tid, int *status, uint64_t *counters)
{
    for (int handled = 0; handled < HOT_YIELD_EVERY; handled++) {
        int st;
        pid_t got = waitpid(-1, &st, __WALL);
        if (got < 0)
            return -errno;
        if ((st & 0xffff) == ((SIGTRAP << 8) | 0x7f) && handle(got, counters) == 0)
            continue;
        *tid = got;
        *status = st;
        return 1;
    }
    return 0;
}
