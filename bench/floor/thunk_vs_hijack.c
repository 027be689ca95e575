/* Two ordered clock reads around a traced call, three ways: back to back
 * (the floor), with the return address replaced in place (the function's
 * ret mispredicts), and through a thunk (calls and returns pair up). See
 * bench/floor/run.sh. */
#include <stdio.h>
#include <stdint.h>
#include <time.h>
uint64_t ring[1<<16]; uint64_t saved_ret;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
__attribute__((noinline)) void two_reads(long n){ for(long i=0;i<n;i++){ unsigned lo,hi; asm volatile("lfence;rdtsc":"=a"(lo),"=d"(hi)); ring[i&0xffff]=lo|((uint64_t)hi<<32); asm volatile("lfence;rdtsc":"=a"(lo),"=d"(hi)); ring[(i+1)&0xffff]=lo|((uint64_t)hi<<32);} }
__attribute__((noinline)) int leaf_body(int x){ return x+1; }
extern int tramp2(int), tramp3(int);
asm(".text\n.globl tramp2\ntramp2:\n push %rax\n push %rdx\n lfence\n rdtsc\n shl $32,%rdx\n or %rdx,%rax\n mov %rax, ring(%rip)\n pop %rdx\n pop %rax\n"
    " pop %r10\n mov %r10, saved_ret(%rip)\n lea leaf_body(%rip), %r11\n call *%r11\n"
    " push %rax\n push %rdx\n lfence\n rdtsc\n shl $32,%rdx\n or %rdx,%rax\n mov %rax, ring+8(%rip)\n pop %rdx\n pop %rax\n push saved_ret(%rip)\n ret\n");
// mispredicting variant: ret into body with hijacked return
asm(".text\n.globl tramp3\ntramp3:\n push %rax\n push %rdx\n lfence\n rdtsc\n shl $32,%rdx\n or %rdx,%rax\n mov %rax, ring(%rip)\n pop %rdx\n pop %rax\n"
    " mov (%rsp), %r10\n mov %r10, saved_ret(%rip)\n lea t3ret(%rip), %r10\n mov %r10, (%rsp)\n jmp leaf_body\n"
    "t3ret:\n push %rax\n push %rdx\n lfence\n rdtsc\n shl $32,%rdx\n or %rdx,%rax\n mov %rax, ring+8(%rip)\n pop %rdx\n pop %rax\n jmp *saved_ret(%rip)\n");
__attribute__((noinline)) long loop2(long n){long s=0;for(long i=0;i<n;i++) s+=tramp2(i);return s;}
__attribute__((noinline)) long loop3(long n){long s=0;for(long i=0;i<n;i++) s+=tramp3(i);return s;}
__attribute__((noinline)) long loop0(long n){long s=0;for(long i=0;i<n;i++) s+=leaf_body(i);return s;}
int main(){ long n=5000000; for(int r=0;r<4;r++){
 double t=now(); two_reads(n); double a=(now()-t)/n;
 t=now(); loop0(n); double z=(now()-t)/n;
 t=now(); loop2(n); double b=(now()-t)/n;
 t=now(); loop3(n); double c=(now()-t)/n;
 printf("two reads %.2f  plain %.2f  call-thunk %.2f (%.2fx)  hijack %.2f (%.2fx)\n",a,z,b-z,(b-z)/a,c-z,(c-z)/a);}}
