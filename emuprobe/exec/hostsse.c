/* Register-only SSE floating point, executed on the tracer's own CPU.
 *
 * Why: Unicorn 2.1.4 computes SSE floating point but never sets MXCSR's
 * exception flags and ignores unmasked exceptions (policy.SSE_FP), so every
 * addsd/mulsd/... site went to the native fallback: stop the other threads,
 * single-step, ~8x the cost of an emulated hit.  An instruction whose operands
 * are XMM registers only, and whose only other state is MXCSR, does exactly
 * the same on any thread of the same CPU.  So: load the tracee's FXSAVE image
 * (what PTRACE_GETFPREGS returns) into our own FPU, run the instruction's
 * bytes, save the image back for PTRACE_SETFPREGS.  Rounding, DAZ/FTZ,
 * denormals and the sticky flags are the CPU's own, by construction; the
 * difftest holds it to the CPU all the same, like every FastPath.
 *
 * Guards: decode.py sends only register-only SSE/SSE2 arithmetic from a fixed
 * list (baseline x86-64, so never #UD) and refuses mandatory-prefix tricks;
 * an MXCSR that unmasks any exception is refused here, since the #XM would
 * hit the tracer; our own FP state is saved and restored around the
 * instruction within one asm block, so the compiler cannot keep a value in
 * an XMM register across it.  The stubs live in the tracer, never the tracee.
 */
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define STUB_SIZE 32   /* 1 length byte, endbr64, <= 15 instruction bytes, ret */
#define STUB_AREA 65536 /* 2048 distinct instructions; beyond, they go native */
#define MAX_STUBS (STUB_AREA / STUB_SIZE)
#define INDEX_SLOTS (2 * MAX_STUBS) /* open addressing, power of two */
#define FX_SIZE 512
#define FX_MXCSR 24    /* offset of MXCSR in the FXSAVE image */
#define MXCSR_ALL_MASKED 0x1f80u

static uint8_t *stub_area;
static int nstubs;
static int16_t stub_index[INDEX_SLOTS]; /* stub number + 1, 0: empty */
static uint8_t own_fx[FX_SIZE] __attribute__((aligned(16)));
static uint8_t img_fx[FX_SIZE] __attribute__((aligned(16)));

static unsigned hash_code(const uint8_t *code, int len)
{
    unsigned h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < len; i++)
        h = (h ^ code[i]) * 16777619u;
    return h;
}

/* The entry point of a stub running `code`, made once per distinct
 * instruction; NULL when the area is full or cannot be made. */
static void *stub_for(const uint8_t *code, int len)
{
    static const uint8_t endbr64[4] = {0xf3, 0x0f, 0x1e, 0xfa};
    if (len <= 0 || len > 15)
        return NULL;
    if (stub_area == NULL) {
        void *p = mmap(NULL, STUB_AREA, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
        stub_area = p;
    }
    unsigned i = hash_code(code, len) & (INDEX_SLOTS - 1);
    for (; stub_index[i]; i = (i + 1) & (INDEX_SLOTS - 1)) {
        uint8_t *s = stub_area + (stub_index[i] - 1) * STUB_SIZE;
        if (s[0] == len && memcmp(s + 1 + sizeof endbr64, code, (size_t)len) == 0)
            return s + 1;
    }
    if (nstubs >= MAX_STUBS)
        return NULL;
    /* W^X: writable only while a stub is added (rare: once per instruction) */
    uint8_t *page = stub_area + ((nstubs * STUB_SIZE) & ~4095);
    if (mprotect(page, 4096, PROT_READ | PROT_WRITE) < 0)
        return NULL;
    uint8_t *s = stub_area + nstubs * STUB_SIZE;
    s[0] = (uint8_t)len;
    memcpy(s + 1, endbr64, sizeof endbr64);
    memcpy(s + 1 + sizeof endbr64, code, (size_t)len);
    s[1 + sizeof endbr64 + len] = 0xc3; /* ret */
    if (mprotect(page, 4096, PROT_READ | PROT_EXEC) < 0)
        return NULL;
    stub_index[i] = (int16_t)(++nstubs);
    return s + 1;
}

/* Run `code` (`len` bytes) against `fx`, a 512-byte FXSAVE image, in place.
 * 0: done; -1: MXCSR unmasks an exception (nothing changed); -2: no stub. */
int host_sse(const uint8_t *code, int len, uint8_t *fx)
{
    uint32_t mxcsr;
    memcpy(&mxcsr, fx + FX_MXCSR, sizeof mxcsr);
    if ((mxcsr & MXCSR_ALL_MASKED) != MXCSR_ALL_MASKED)
        return -1;
    void *stub = stub_for(code, len);
    if (stub == NULL)
        return -2;
    memcpy(img_fx, fx, FX_SIZE);
    __asm__ volatile(
        "fxsave64 %[own]\n\t"
        "fxrstor64 %[img]\n\t"
        "sub $128, %%rsp\n\t" /* the call must not write into our red zone */
        "call *%[stub]\n\t"
        "add $128, %%rsp\n\t"
        "fxsave64 %[img]\n\t"
        "fxrstor64 %[own]\n\t"
        : [own] "+m"(own_fx), [img] "+m"(img_fx)
        : [stub] "r"(stub)
        : "memory", "cc");
    memcpy(fx, img_fx, FX_SIZE);
    return 0;
}
