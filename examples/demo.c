/* The demo target of `make demo`: a small program with a hot function whose
 * first instruction is a push (emulated by the fast path) and one that starts
 * with a RIP-relative load (emulated in Unicorn). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile long total;

__attribute__((noinline)) long add_to_total(long x) {
    total += x;
    return total;
}

__attribute__((noinline)) long read_total(void) {
    return total;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 5;
    for (int i = 1; i <= n; i++)
        add_to_total(i);
    printf("demo: total %ld after %d calls\n", read_total(), n);
    /* `make demo` compares this process's own view of its address space,
     * traced and untraced. */
    const char *maps_out = getenv("EMUPROBE_DEMO_MAPS");
    if (maps_out) {
        FILE *in = fopen("/proc/self/maps", "r"), *out = fopen(maps_out, "w");
        char line[512];
        while (in && out && fgets(line, sizeof line, in))
            fputs(line, out);
        if (in) fclose(in);
        if (out) fclose(out);
    }
    return 0;
}
