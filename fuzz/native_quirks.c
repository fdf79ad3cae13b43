/* native_quirks: what THIS CPU does where x86 vendors (and Unicorn, which
 * follows Intel) differ, measured natively: no ptrace, no emulator.
 *
 *   gcc -O0 -o /tmp/native_quirks fuzz/native_quirks.c && /tmp/native_quirks
 *
 * The difftest found these as mismatches or as results equal only after
 * masking the bits the SDM leaves undefined; this program confirms each is
 * the CPU's own behaviour, not an artefact of the ptrace sandbox:
 *   - a rep prefix on loope/loopne (AMD: F3 loops while ZF=1, F2 while
 *     ZF=0, the last prefix winning; Intel ignores it);
 *   - AF after a shift by a non-zero count (undefined: AMD sets it,
 *     Unicorn clears it);
 *   - SF/ZF/AF/PF after imul (undefined: AMD leaves them as they were,
 *     Unicorn computes them from the result);
 *   - the result of a 16-bit shld with a count of 17-31 (undefined);
 *   - RDI after `rep movsb` with a 67 (32-bit address) prefix and RCX=0:
 *     whether the upper half of RDI is cleared although nothing is copied
 *     (the Intel Xeon 6/167 here clears it, Unicorn leaves it).
 */
#include <stdint.h>
#include <stdio.h>

#define FLAGS 0x8d5ULL /* CF PF AF ZF SF OF */

static uint64_t shr5_flags(uint64_t x, uint64_t in) {
    uint64_t out;
    __asm__ volatile("push %2; popf; shr $5, %1; pushf; pop %0"
                     : "=r"(out), "+r"(x) : "r"(in) : "cc");
    return out & FLAGS;
}

static uint64_t imul_flags(uint64_t a, uint64_t b, uint64_t in) {
    uint64_t out;
    __asm__ volatile("push %3; popf; imul %2, %1; pushf; pop %0"
                     : "=r"(out), "+r"(a) : "r"(b), "r"(in) : "cc");
    return out & FLAGS;
}

/* loopne (E0) / loope (E1) over a 2-byte jmp, with an optional prefix. */
#define LOOP_TAKEN(bytes, rcx, in, taken)                                          \
    __asm__ volatile("push %2; popf; mov $0, %0; .byte " bytes ", 0x02; jmp 1f;" \
                     "mov $1, %0; 1:"                                               \
                     : "=&r"(taken), "+c"(rcx) : "r"(in) : "cc")

static int loop_taken(int form, uint64_t rcx, int zf) {
    uint64_t taken, in = 0x202 | (zf ? 0x40 : 0);
    switch (form) {
    case 0: LOOP_TAKEN("0xe0", rcx, in, taken); break;
    case 1: LOOP_TAKEN("0xf3, 0xe0", rcx, in, taken); break;
    case 2: LOOP_TAKEN("0xf2, 0xe0", rcx, in, taken); break;
    case 3: LOOP_TAKEN("0xe1", rcx, in, taken); break;
    case 4: LOOP_TAKEN("0xf3, 0xe1", rcx, in, taken); break;
    default: LOOP_TAKEN("0xf2, 0xe1", rcx, in, taken); break;
    }
    return (int)taken;
}

static uint16_t shld16(uint16_t dst, uint16_t src, uint8_t count) {
    __asm__ volatile("shldw %%cl, %1, %0" : "+r"(dst) : "r"(src), "c"(count) : "cc");
    return dst;
}

static uint64_t rep_movsb_a32_rdi(uint64_t rdi) {
    /* rcx=0: no byte is copied, so rsi/rdi need not point anywhere */
    __asm__ volatile("xor %%ecx, %%ecx; mov %%rdi, %%rsi; .byte 0xf3, 0x67, 0xa4"
                     : "+D"(rdi) : : "rcx", "rsi", "memory");
    return rdi;
}

int main(void) {
    const char *forms[] = {"loopne", "f3 loopne", "f2 loopne", "loope", "f3 loope", "f2 loope"};
    printf("cpu: see /proc/cpuinfo (vendor_id, cpu family, model)\n");
    for (int f = 0; f < 6; f++)
        printf("%-10s rcx=5: taken with ZF=0 %d, with ZF=1 %d\n", forms[f],
               loop_taken(f, 5, 0), loop_taken(f, 5, 1));
    uint64_t ins[] = {0x202, 0x212, 0x202 | FLAGS};
    for (int i = 0; i < 3; i++)
        printf("flags before %#05llx: after shr rax,5 %#05llx; after imul 3*5 %#05llx\n",
               (unsigned long long)(ins[i] & FLAGS), (unsigned long long)shr5_flags(0x123, ins[i]),
               (unsigned long long)imul_flags(3, 5, ins[i]));
    printf("shld ax, bx, cl with ax=0x1234 bx=0xabcd:");
    for (int c = 16; c <= 20; c++)
        printf(" cl=%d %#06x", c, shld16(0x1234, 0xabcd, (uint8_t)c));
    printf("\n");
    printf("rep movsb with a 67 prefix, rcx=0, rdi=0x200010000: rdi after %#llx\n",
           (unsigned long long)rep_movsb_a32_rdi(0x200010000ULL));
    return 0;
}
