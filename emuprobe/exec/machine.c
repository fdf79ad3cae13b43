/* The reusable Unicorn machine, compiled: one instruction per hit, with the
 * tracee's memory shown lazily and freshly.  machine.py documents the model
 * (page buffers mapped with uc_mem_map_ptr and kept; a page re-read from
 * /proc/PID/mem the first time a hit touches it; permissions from the maps;
 * the instruction poked before every run with a hlt after it; translation
 * blocks dropped when a site's bytes change) and keeps the pure-Python
 * machine, which is the fallback when this module is not built.
 *
 * Why in C: a profile of a Unicorn-path hit (perf, 20,000 hits of
 * `add rax, [rip+d]`) put 67% of the tracer's time in the CPython interpreter
 * and 1.6% in libunicorn: the emulation is cheap, the Python glue around it
 * (the binding's hook trampolines, ctypes batches, page bookkeeping) is not.
 * Here the hooks are C functions, so Python's Machine.run is one call, and
 * the compiled hot loop (engine/hotloop.c) runs the same mach_run()
 * without Python at all.  One implementation: the difftest reaches it
 * through Emulator.step like every hit.
 *
 * Unicorn is not linked: Python hands over the engine it created and the
 * library's entry points (from the binding's ctypes handle), so the module
 * builds without Unicorn's headers or library.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/user.h>
#include <unistd.h>

#define M_PAGE 0x1000ULL
#define M_OFF (M_PAGE - 1)
#define M_MAX_PAGES 256   /* beyond this, drop every page and block at the next hit */
#define M_PAGE_SLOTS 1024 /* open addressing over mapped pages, power of two */
#define M_TB_SLOTS 4096   /* site -> bytes its cached block came from */
#define M_MAX_FRESH 64    /* pages one hit may touch (rep strings: <= 4096*8 bytes) */
#define M_MAX_STORES 64   /* merged store spans of one hit */
#define M_REP_LIMIT 4096  /* policy.REP_LIMIT */
#define M_MARGIN 0x10000ULL /* addresses.py _MARGIN */
#define HLT 0xf4

#define P_READ 1 /* maps.PROT_* */
#define P_WRITE 2
#define P_EXEC 4

#define FX_MXCSR 24
#define FX_XMM 160

/* mach_run() results besides 0 (done) and M_REFUSED (see m->reason) */
#define M_REFUSED 1
#define M_MAPS_MISS 2 /* an address outside the maps given: refresh them and run again */
#define M_HANDBACK 3  /* no-Python mode met what only Python may decide */
#define M_COMMIT_FAILED 4 /* a store could not be written back (errno in m->err) */
#define M_CRASHED 5 /* Unicorn crashed inside emu_start: this machine is dead, make another */

/* run flags */
#define MF_MAPS_FRESH 1 /* the maps were just re-read: a miss is an unmapped address */
#define MF_NO_PYTHON 2  /* from the hot loop: hand back exec-page data and map misses */
#define MF_KEEP_STORES 4 /* leave the stores to the caller (mach_store), which records them */
#define MF_TEST_CRASH 8  /* fault on purpose inside the guarded run (tests the guard) */

#include "machine.h"

/* One address space as the machine sees it: /proc/PID/mem, its maps, and the
 * bytes our int3s displaced (machine.py pushes both when they change). */
struct memctx {
    int fd;
    int nregions;
    uint64_t *starts, *ends;
    int32_t *prots;
    int nplanted;
    uint64_t *paddrs; /* sorted */
    uint8_t *pbytes;  /* 16 per site: length, then the bytes */
};

struct page_slot { uint64_t page; uint8_t *host; }; /* host NULL: empty */
struct tb_slot { uint64_t site; uint8_t len; uint8_t code[15]; };
struct span { uint64_t start, end; };

struct mach {
    struct uc_api api;
    uc_engine *uc;
    struct page_slot pages[M_PAGE_SLOTS];
    int npages;
    struct tb_slot tb[M_TB_SLOTS];
    /* the hit in progress */
    struct memctx *mem;
    int flags;
    uint64_t site, next, code_end, guard, lowest;
    uint8_t blob[17];
    int blob_len;
    uint64_t fresh_page[M_MAX_FRESH];
    int fresh_prot[M_MAX_FRESH];
    int nfresh;
    struct span stores[M_MAX_STORES];
    int nstores;
    int faulted, escaped, maps_miss, handback, err;
    int dead; /* crashed once: its Unicorn state is unknown, so it never runs again */
    char reason[192];
};

/* ---- small tables ---------------------------------------------------------- */

static unsigned mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (unsigned)x;
}

static uint8_t *page_host(struct mach *m, uint64_t page)
{
    for (unsigned i = mix(page) & (M_PAGE_SLOTS - 1);; i = (i + 1) & (M_PAGE_SLOTS - 1)) {
        if (m->pages[i].host == NULL)
            return NULL;
        if (m->pages[i].page == page)
            return m->pages[i].host;
    }
}

static void fail(struct mach *m, const char *fmt, ...)
{
    if (!m->faulted) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->reason, sizeof m->reason, fmt, ap);
        va_end(ap);
        m->faulted = 1;
    }
    m->api.emu_stop(m->uc);
}

static uint8_t *map_page(struct mach *m, uint64_t page)
{
    if (m->npages >= M_PAGE_SLOTS / 2) {
        fail(m, "emulator page table full");
        return NULL;
    }
    uint8_t *host = aligned_alloc(M_PAGE, M_PAGE);
    if (host == NULL) {
        fail(m, "out of memory for an emulator page");
        return NULL;
    }
    memset(host, 0, M_PAGE);
    int rc = m->api.mem_map_ptr(m->uc, page, M_PAGE, (uint32_t)m->api.prot_all, host);
    if (rc) {
        free(host);
        fail(m, "unicorn: %s", m->api.strerror(rc));
        return NULL;
    }
    unsigned i = mix(page) & (M_PAGE_SLOTS - 1);
    while (m->pages[i].host != NULL)
        i = (i + 1) & (M_PAGE_SLOTS - 1);
    m->pages[i].page = page;
    m->pages[i].host = host;
    m->npages++;
    return host;
}

static void drop_all(struct mach *m)
{
    for (int i = 0; i < M_PAGE_SLOTS; i++)
        if (m->pages[i].host != NULL) {
            m->api.mem_unmap(m->uc, m->pages[i].page, M_PAGE);
            free(m->pages[i].host);
            m->pages[i].host = NULL;
        }
    m->npages = 0;
    memset(m->tb, 0, sizeof m->tb);
    m->api.ctl(m->uc, m->api.ctl_flush_tb);
}

static struct tb_slot *tb_slot(struct mach *m, uint64_t site)
{
    return &m->tb[mix(site) & (M_TB_SLOTS - 1)]; /* direct-mapped: a collision only costs a retranslation */
}

static void tb_forget(struct mach *m, uint64_t site)
{
    struct tb_slot *t = tb_slot(m, site);
    if (t->site == site)
        t->len = 0;
}

static void remove_cache(struct mach *m, uint64_t begin, uint64_t end)
{
    m->api.ctl(m->uc, m->api.ctl_remove_cache, begin, end);
}

/* Copy `len` bytes to `addr` in our page buffers, clipped to [lo, hi). */
static void poke(struct mach *m, uint64_t addr, const uint8_t *data, int len, uint64_t lo, uint64_t hi)
{
    uint64_t start = addr > lo ? addr : lo, end = addr + (uint64_t)len < hi ? addr + (uint64_t)len : hi;
    while (start < end) {
        uint64_t page = start & ~M_OFF, stop = end < page + M_PAGE ? end : page + M_PAGE;
        uint8_t *host = page_host(m, page);
        if (host != NULL)
            memcpy(host + (start - page), data + (start - addr), stop - start);
        start = stop;
    }
}

/* ---- the tracee's memory ---------------------------------------------------- */

static int region(struct memctx *c, uint64_t addr)
{
    int lo = 0, hi = c->nregions - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (addr < c->starts[mid])
            hi = mid - 1;
        else if (addr >= c->ends[mid])
            lo = mid + 1;
        else
            return mid;
    }
    return -1;
}

/* Re-read `page` from the tracee for this hit; 0 (having failed or stopped)
 * if it cannot be shown. */
static int refresh(struct mach *m, uint64_t page)
{
    struct memctx *c = m->mem;
    int r = region(c, page);
    if (r < 0) {
        if (m->flags & MF_MAPS_FRESH) {
            fail(m, "access to unmapped address %#llx", (unsigned long long)page);
        } else {
            m->maps_miss = 1;
            m->api.emu_stop(m->uc);
        }
        return 0;
    }
    if ((c->prots[r] & P_EXEC) && (m->flags & MF_NO_PYTHON)) {
        /* may hold int3s planted after Python last pushed them: its call */
        m->handback = 1;
        m->api.emu_stop(m->uc);
        return 0;
    }
    if (m->nfresh >= M_MAX_FRESH) {
        fail(m, "touches more than %d pages", M_MAX_FRESH);
        return 0;
    }
    uint8_t *host = page_host(m, page);
    if (host == NULL && (host = map_page(m, page)) == NULL)
        return 0;
    ssize_t n = pread(c->fd, host, M_PAGE, (off_t)page);
    if (n != (ssize_t)M_PAGE) {
        fail(m, "cannot read tracee page %#llx: %s", (unsigned long long)page,
             n < 0 ? strerror(errno) : "short read");
        return 0;
    }
    uint64_t end = page + M_PAGE;
    /* the program's bytes where our int3s are (first site at or after page-15) */
    int lo = 0, hi = c->nplanted;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->paddrs[mid] + 15 < page)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (int i = lo; i < c->nplanted && c->paddrs[i] < end; i++) {
        const uint8_t *b = c->pbytes + 16 * i;
        poke(m, c->paddrs[i], b + 1, b[0], page, end);
    }
    if (page < m->code_end && m->site < end)
        poke(m, m->site, m->blob, m->blob_len, page, end);
    m->fresh_page[m->nfresh] = page;
    m->fresh_prot[m->nfresh++] = c->prots[r];
    return 1;
}

/* The tracee's protection common to [addr, addr+size), refreshing pages; -1
 * if not available. */
static int fresh_prot(struct mach *m, uint64_t addr, int size)
{
    uint64_t page = addr & ~M_OFF, last = (addr + (uint64_t)(size > 0 ? size : 1) - 1) & ~M_OFF;
    int prot = P_READ | P_WRITE | P_EXEC;
    for (;;) {
        int p = -1;
        for (int i = 0; i < m->nfresh; i++)
            if (m->fresh_page[i] == page) {
                p = m->fresh_prot[i];
                break;
            }
        if (p < 0) {
            if (!refresh(m, page))
                return -1;
            p = m->fresh_prot[m->nfresh - 1];
        }
        prot &= p;
        if (page >= last)
            return prot;
        page += M_PAGE;
    }
}

/* ---- hooks ------------------------------------------------------------------ */

static bool on_unmapped(uc_engine *uc, int type, uint64_t addr, int size, int64_t value, void *ud)
{
    struct mach *m = ud;
    (void)uc, (void)value;
    if (type == m->api.mem_fetch_unmapped) {
        /* only the next instruction's fetch gets here: ours is mapped */
        if (!(m->site <= addr && addr < m->next))
            m->escaped = 1;
        return false;
    }
    return fresh_prot(m, addr, size) >= 0;
}

static void on_read(uc_engine *uc, int type, uint64_t addr, int size, int64_t value, void *ud)
{
    struct mach *m = ud;
    (void)uc, (void)type, (void)value;
    int prot = fresh_prot(m, addr, size);
    if (prot < 0)
        return;
    if (!(prot & P_READ))
        fail(m, "read from unreadable page at %#llx", (unsigned long long)addr);
    else if (addr <= m->guard && m->guard < addr + (uint64_t)size)
        fail(m, "reads the byte after itself, where the stop byte is");
    else if (addr < m->lowest)
        m->lowest = addr;
}

static void on_write(uc_engine *uc, int type, uint64_t addr, int size, int64_t value, void *ud)
{
    struct mach *m = ud;
    (void)uc, (void)type, (void)value;
    int prot = fresh_prot(m, addr, size);
    if (prot < 0)
        return;
    if (!(prot & P_WRITE)) {
        fail(m, "store to non-writable page at %#llx", (unsigned long long)addr);
        return;
    }
    if (prot & P_EXEC) {
        fail(m, "store to executable page at %#llx (may hold int3s)", (unsigned long long)addr);
        return;
    }
    uint64_t end = addr + (uint64_t)size;
    struct span *last = m->nstores ? &m->stores[m->nstores - 1] : NULL;
    if (last != NULL && last->start <= end && addr <= last->end) { /* touches: merge */
        if (addr < last->start)
            last->start = addr;
        if (end > last->end)
            last->end = end;
    } else if (m->nstores < M_MAX_STORES) {
        m->stores[m->nstores].start = addr;
        m->stores[m->nstores++].end = end;
    } else {
        fail(m, "more than %d separate stores", M_MAX_STORES);
        return;
    }
    if (addr < m->lowest)
        m->lowest = addr;
}

static void on_intr(uc_engine *uc, uint32_t intno, void *ud)
{
    (void)uc;
    fail(ud, "CPU exception %u in the emulator", intno);
}

static bool on_invalid(uc_engine *uc, void *ud)
{
    (void)uc;
    fail(ud, "Unicorn: invalid instruction");
    return false;
}

static void on_syscall(uc_engine *uc, void *ud)
{
    (void)uc;
    fail(ud, "syscall reached the emulator");
}

/* ---- the crash guard -------------------------------------------------------- */

/* Unicorn 2.1.4 has crashed inside emu_start on rare states (SIGSEGV, twice in
 * ~900k difftest cases, not reproducible per case).  In the tracer that would
 * kill emuprobe with int3s still planted in attached processes.  So a fatal
 * signal inside a run jumps back to mach_run, which refuses the hit (it goes
 * native) and marks the machine dead; cmachine.py makes a new engine.  Any
 * other fatal signal goes to whoever handled it before (Python's faulthandler
 * or the default action). */
static const int crash_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
static struct sigaction prev_action[sizeof crash_signals / sizeof crash_signals[0]];
static sigjmp_buf crash_env;
static volatile sig_atomic_t in_run;
static int guard_installed;

static void on_crash(int sig, siginfo_t *si, void *uctx)
{
    if (in_run) {
        in_run = 0;
        siglongjmp(crash_env, sig); /* SA_NODEFER: the signal is not left blocked */
    }
    for (size_t i = 0; i < sizeof crash_signals / sizeof crash_signals[0]; i++) {
        if (crash_signals[i] != sig)
            continue;
        struct sigaction *prev = &prev_action[i];
        if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction != NULL) {
            prev->sa_sigaction(sig, si, uctx);
            return;
        }
        if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler != SIG_DFL &&
            prev->sa_handler != SIG_IGN) {
            prev->sa_handler(sig);
            return;
        }
        sigaction(sig, prev, NULL); /* the default: the fault repeats and kills */
        return;
    }
}

static void install_guard(void)
{
    if (guard_installed)
        return;
    stack_t old;
    if (sigaltstack(NULL, &old) == 0 && (old.ss_flags & SS_DISABLE)) {
        /* a handler for a stack overflow needs a stack of its own */
        stack_t st = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16, .ss_flags = 0};
        if (st.ss_sp != NULL)
            sigaltstack(&st, NULL);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof crash_signals / sizeof crash_signals[0]; i++)
        sigaction(crash_signals[i], &sa, &prev_action[i]);
    guard_installed = 1;
}

/* ---- set-up ----------------------------------------------------------------- */

struct mach *mach_new(uc_engine *uc, const struct uc_api *api)
{
    struct mach *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    m->api = *api;
    m->uc = uc;
    uc_hook h;
    int rc = 0;
    rc |= api->hook_add(uc, &h, api->hook_mem_unmapped, (void *)on_unmapped, m, 1, 0);
    rc |= api->hook_add(uc, &h, api->hook_mem_read, (void *)on_read, m, 1, 0);
    rc |= api->hook_add(uc, &h, api->hook_mem_write, (void *)on_write, m, 1, 0);
    rc |= api->hook_add(uc, &h, api->hook_intr, (void *)on_intr, m, 1, 0);
    rc |= api->hook_add(uc, &h, api->hook_insn_invalid, (void *)on_invalid, m, 1, 0);
    rc |= api->hook_add(uc, &h, api->hook_insn, (void *)on_syscall, m, 1, 0, api->ins_syscall);
    if (rc) {
        free(m);
        return NULL;
    }
    install_guard();
    return m;
}

struct memctx *memctx_new(int fd)
{
    struct memctx *c = calloc(1, sizeof *c);
    if (c != NULL)
        c->fd = fd;
    return c;
}

void memctx_free(struct memctx *c)
{
    if (c == NULL)
        return;
    free(c->starts), free(c->ends), free(c->prots), free(c->paddrs), free(c->pbytes);
    free(c);
}

/* Sorted, non-overlapping mappings. */
int memctx_set_maps(struct memctx *c, const uint64_t *starts, const uint64_t *ends,
                    const int32_t *prots, int n)
{
    size_t k = n > 0 ? (size_t)n : 1;
    uint64_t *s = malloc(8 * k), *e = malloc(8 * k);
    int32_t *p = malloc(4 * k);
    if (s == NULL || e == NULL || p == NULL) {
        free(s), free(e), free(p);
        return -1;
    }
    memcpy(s, starts, 8 * (size_t)n), memcpy(e, ends, 8 * (size_t)n), memcpy(p, prots, 4 * (size_t)n);
    free(c->starts), free(c->ends), free(c->prots);
    c->starts = s, c->ends = e, c->prots = p, c->nregions = n;
    return 0;
}

/* Sorted addresses; `bytes` holds 16 per site: the length, then the bytes. */
int memctx_set_planted(struct memctx *c, const uint64_t *addrs, const uint8_t *bytes, int n)
{
    size_t k = n > 0 ? (size_t)n : 1;
    uint64_t *a = malloc(8 * k);
    uint8_t *b = malloc(16 * k);
    if (a == NULL || b == NULL) {
        free(a), free(b);
        return -1;
    }
    memcpy(a, addrs, 8 * (size_t)n), memcpy(b, bytes, 16 * (size_t)n);
    free(c->paddrs), free(c->pbytes);
    c->paddrs = a, c->pbytes = b, c->nplanted = n;
    return 0;
}

const char *mach_reason(struct mach *m) { return m->reason; }

int mach_nstores(struct mach *m) { return m->nstores; }

/* Store `i` of the last run: its address in *addr, its bytes (at most `cap`)
 * in `buf`; returns its length. */
int mach_store(struct mach *m, int i, uint64_t *addr, uint8_t *buf, int cap)
{
    uint64_t a = m->stores[i].start, end = m->stores[i].end;
    int n = 0;
    *addr = a;
    while (a < end && n < cap) {
        uint64_t page = a & ~M_OFF, stop = end < page + M_PAGE ? end : page + M_PAGE;
        if (stop - a > (uint64_t)(cap - n))
            stop = a + (uint64_t)(cap - n);
        memcpy(buf + n, page_host(m, page) + (a - page), stop - a);
        n += (int)(stop - a);
        a = stop;
    }
    return n;
}
int mach_errno(struct mach *m) { return m->err; }

/* ---- the hit ---------------------------------------------------------------- */

#define MREG(regs, off) (*(uint64_t *)((uint8_t *)(regs) + (off)))

static int canonical(uint64_t a)
{
    return a < 0x0000800000000000ULL || a >= 0xffff800000000000ULL;
}

static int safe(uint64_t a)
{
    return canonical(a - M_MARGIN) && canonical(a + M_MARGIN);
}

/* addresses.check: near or in the non-canonical hole, which Unicorn aliases */
static int near_hole(const struct mplan *p, const uint8_t *regs, uint64_t next)
{
    for (int i = 0; i < p->nrefs; i++) {
        const struct mref *r = &p->refs[i];
        uint64_t ea = (uint64_t)r->disp;
        if (r->base == -2)
            ea += next;
        else if (r->base >= 0)
            ea += MREG(regs, r->base);
        if (r->index >= 0)
            ea += MREG(regs, r->index) * (uint64_t)r->scale;
        if (r->bitreg >= 0) {
            uint64_t v = MREG(regs, r->bitreg);
            int bits = 8 * r->bitsize;
            int64_t sv = bits == 64 ? (int64_t)v
                                    : (int64_t)(v << (64 - bits)) >> (64 - bits); /* sign-extend */
            ea += (uint64_t)(sv >> 3);
        }
        if (r->a32)
            ea &= 0xffffffffULL;
        if (r->seg >= 0)
            ea += MREG(regs, r->seg);
        if (!safe(ea))
            return 1;
    }
    for (int i = 0; i < p->nimplicit; i++)
        if (!safe(MREG(regs, p->implicit[i])))
            return 1;
    return 0;
}

static int refuse(struct mach *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->reason, sizeof m->reason, fmt, ap);
    va_end(ap);
    return M_REFUSED;
}

static void begin(struct mach *m, struct memctx *mem, int flags, uint64_t site,
                  const uint8_t *code, int len)
{
    if (m->npages > M_MAX_PAGES)
        drop_all(m);
    m->mem = mem;
    m->flags = flags;
    m->nfresh = m->nstores = 0;
    m->faulted = m->escaped = m->maps_miss = m->handback = 0;
    m->reason[0] = 0;
    m->site = site;
    m->next = site + (uint64_t)len;
    m->lowest = UINT64_MAX;
    /* hlt right after the instruction, even on the next page: QEMU's
     * translator reads on across page ends */
    m->guard = m->next;
    memcpy(m->blob, code, (size_t)len);
    m->blob[len] = HLT;
    m->blob_len = len + 1;
    m->code_end = site + (uint64_t)m->blob_len;
    uint64_t page = site & ~M_OFF;
    if (page_host(m, page) == NULL)
        map_page(m, page);
    if (m->code_end > page + M_PAGE && page_host(m, page + M_PAGE) == NULL)
        map_page(m, page + M_PAGE);
    poke(m, site, m->blob, m->blob_len, 0, UINT64_MAX);
    struct tb_slot *t = tb_slot(m, site);
    if (t->site != site || t->len != len || memcmp(t->code, code, (size_t)len) != 0) {
        remove_cache(m, site, m->code_end);
        t->site = site;
        t->len = (uint8_t)len;
        memcpy(t->code, code, (size_t)len);
    }
}

/* Emulate `p` (the instruction `code`, at regs.rip) for one hit.  0: done,
 * registers (and `fx`, if *fp_written) updated in place and stores written
 * to the tracee; anything else: nothing changed (M_COMMIT_FAILED aside). */
int mach_run(struct mach *m, const struct mplan *p, const char *code_chars, int code_len,
             uint8_t *regs, uint8_t *fx, struct memctx *mem, int flags, int *fp_written)
{
    const uint8_t *code = (const uint8_t *)code_chars;
    *fp_written = 0;
    if (m->dead) {
        refuse(m, "the emulator crashed earlier");
        return M_CRASHED;
    }
    uint64_t site = MREG(regs, p->offs[p->rip_i]);
    int len = p->length;
    if (code_len < len)
        return refuse(m, "instruction longer than the bytes given");
    uint64_t next = site + (uint64_t)len;
    uint64_t rcx = MREG(regs, offsetof(struct user_regs_struct, rcx));
    if (p->rep && rcx > M_REP_LIMIT)
        return refuse(m, "rep count %llu > %d: native is faster", (unsigned long long)rcx, M_REP_LIMIT);
    if (near_hole(p, regs, next))
        return refuse(m, "address near the non-canonical hole: left to the CPU");
    begin(m, mem, flags, site, code, len);
    if (p->rep) { /* it runs on into the block at `next`, which must be our hlt */
        remove_cache(m, next, next + 1);
        tb_forget(m, next);
    }

    uint64_t before[32], vals[32];
    void *ptrs[32];
    for (int i = 0; i < p->nregs; i++) {
        before[i] = vals[i] = MREG(regs, p->offs[i]);
        ptrs[i] = &vals[i];
    }
    vals[p->eflags_i] = (before[p->eflags_i] & p->emulated_flags) | p->reserved_one;
    int rc = m->api.reg_write_batch(m->uc, p->uc_ids, ptrs, p->nregs);
    if (rc)
        return refuse(m, "unicorn: %s", m->api.strerror(rc));
    uint8_t xin[17][16], xout[17][16];
    void *xptrs[17];
    int nx = p->nxmm; /* XMM registers, then MXCSR */
    if (p->needs_fp) {
        for (int i = 0; i < nx; i++)
            memcpy(xin[i], fx + FX_XMM + 16 * p->xmm_idx[i], 16);
        memset(xin[nx], 0, 16);
        memcpy(xin[nx], fx + FX_MXCSR, 4);
        memcpy(xout, xin, sizeof xin);
        for (int i = 0; i <= nx; i++)
            xptrs[i] = xout[i];
        if ((rc = m->api.reg_write_batch(m->uc, p->xmm_uc, xptrs, nx + 1)))
            return refuse(m, "unicorn: %s", m->api.strerror(rc));
    }

    int sig = sigsetjmp(crash_env, 0);
    if (sig != 0) {
        m->mem = NULL;
        m->dead = 1;
        snprintf(m->reason, sizeof m->reason,
                 "the emulator crashed (signal %d): a new one replaces it", sig);
        return M_CRASHED;
    }
    in_run = 1;
    if (flags & MF_TEST_CRASH)
        *(volatile int *)0 = 0;
    int status = m->api.emu_start(m->uc, site, 0, 0, p->rep ? (size_t)1 << 62 : 1);
    in_run = 0;
    m->mem = NULL;
    if (m->maps_miss)
        return M_MAPS_MISS;
    if (m->handback)
        return M_HANDBACK;
    if (m->faulted)
        return M_REFUSED;
    if (status && !m->escaped)
        return refuse(m, "unicorn: %s", m->api.strerror(status));
    if (p->aligned16 && (m->lowest & 15))
        /* QEMU splits the 16-byte access in two and never checks alignment */
        return refuse(m, "misaligned 16-byte SSE access at %#llx (#GP)", (unsigned long long)m->lowest);

    if ((rc = m->api.reg_read_batch(m->uc, p->uc_ids, ptrs, p->nregs)))
        return refuse(m, "unicorn: %s", m->api.strerror(rc));
    uint64_t rip = vals[p->rip_i];
    if (p->rep && rip == next + 1)
        rip = next; /* it stopped by executing our hlt */
    if (rip != site)
        tb_forget(m, rip); /* a block may have been translated there */
    if (!p->branch && rip != next)
        return refuse(m, "Unicorn stopped at %#llx, expected %#llx", (unsigned long long)rip,
                      (unsigned long long)next);
    if (!canonical(rip))
        return refuse(m, "branch to non-canonical %#llx (#GP)", (unsigned long long)rip);
    int xmm_changed = 0;
    if (p->needs_fp) {
        if ((rc = m->api.reg_read_batch(m->uc, p->xmm_uc, xptrs, nx)))
            return refuse(m, "unicorn: %s", m->api.strerror(rc));
        /* compare rather than trust capstone's idea of which XMM it writes */
        xmm_changed = memcmp(xin, xout, 16 * (size_t)nx) != 0;
    }

    /* commit: nothing above changed the tracee or `regs` */
    for (int i = 0; i < m->nstores && !(flags & MF_KEEP_STORES); i++) {
        uint64_t a = m->stores[i].start;
        while (a < m->stores[i].end) {
            uint64_t page = a & ~M_OFF;
            uint64_t stop = m->stores[i].end < page + M_PAGE ? m->stores[i].end : page + M_PAGE;
            ssize_t n = pwrite(mem->fd, page_host(m, page) + (a - page), stop - a, (off_t)a);
            if (n != (ssize_t)(stop - a)) {
                m->err = n < 0 ? errno : EIO;
                snprintf(m->reason, sizeof m->reason, "short write at %#llx", (unsigned long long)a);
                return M_COMMIT_FAILED;
            }
            a = stop;
        }
    }
    for (int i = 0; i < p->nregs; i++)
        if (i != p->eflags_i && i != p->rip_i)
            MREG(regs, p->offs[i]) = vals[i];
    MREG(regs, p->offs[p->eflags_i]) =
        (before[p->eflags_i] & ~p->emulated_flags) | (vals[p->eflags_i] & p->emulated_flags);
    MREG(regs, p->offs[p->rip_i]) = rip;
    if (xmm_changed) {
        for (int i = 0; i < nx; i++)
            memcpy(fx + FX_XMM + 16 * p->xmm_idx[i], xout[i], 16);
        *fp_written = 1;
    }
    return 0;
}
