/* The floor of a timestamped entry+exit with the graph trampolines' shape:
 * the function is called through a thunk (calls and returns pair up), each
 * side reads `lfence; rdtsc` and streams its record(s) into a 128 MiB ring
 * (16 bytes at entry, 32 at exit, as textpoke's recorder does), plus NFILL
 * independent filler instructions per side: how much each instruction
 * between two ordered clock reads costs. Prints the best of 5 rounds
 * against two back-to-back clock reads. See bench/floor/run.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#ifndef NFILL
#define NFILL 0
#endif
#define STR2(x) #x
#define STR(x) STR2(x)
uint64_t *bigring;
uint64_t head;
uint64_t saved_ret;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
__attribute__((noinline)) void two_reads(long n) {
    for (long i = 0; i < n; i++) {
        unsigned lo, hi;
        asm volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
        asm volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    }
}
__attribute__((noinline)) int leaf_body(int x) { return x + 1; }
extern int tramp(int);
asm(".text\n.globl tramp\ntramp:\n"
    " push %rax\n push %rdx\n push %rcx\n push %r8\n push %r9\n push %r10\n"
    " lfence\n rdtsc\n shl $32, %rdx\n or %rdx, %rax\n"
    " mov head(%rip), %rcx\n shl $4, %rcx\n add bigring(%rip), %rcx\n mov %rax, (%rcx)\n mov %rax, 8(%rcx)\n incq head(%rip)\n"
    " .rept " STR(NFILL) "\n add $1, %r8\n .endr\n"
    " pop %r10\n pop %r9\n pop %r8\n pop %rcx\n pop %rdx\n pop %rax\n"
    " pop %r10\n mov %r10, saved_ret(%rip)\n lea leaf_body(%rip), %r11\n call *%r11\n"
    " push %rax\n push %rdx\n"
    " lfence\n rdtsc\n shl $32, %rdx\n or %rdx, %rax\n"
    " mov head(%rip), %rcx\n shl $4, %rcx\n add bigring(%rip), %rcx\n"
    " mov %rax, (%rcx)\n mov %rax, 8(%rcx)\n mov %rax, 16(%rcx)\n mov %rax, 24(%rcx)\n addq $2, head(%rip)\n"
    " .rept " STR(NFILL) "\n add $1, %r8\n .endr\n"
    " pop %rdx\n pop %rax\n push saved_ret(%rip)\n ret\n");
__attribute__((noinline)) long loop(long n) { long s = 0; for (long i = 0; i < n; i++) s += tramp(i); return s; }
int main(void) {
    long n = 2000000;
    bigring = mmap(0, (1UL << 23) * 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    double best = 1e9, base = 1e9;
    for (int r = 0; r < 5; r++) {
        double t = now(); two_reads(n); double a = (now() - t) / n; if (a < base) base = a;
        head = 0; t = now(); loop(n); double b = (now() - t) / n; if (b < best) best = b;
    }
    printf("filler %3d per side: two clock reads %.2f ns, thunk + ring + filler %.2f ns (%.2fx)\n", NFILL, base, best, best / base);
    return 0;
}
