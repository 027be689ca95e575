/* Sustained load with sleepers (not part of CI): 8 threads calling
 * top -> mid -> leaf (7 traced calls per top call) on 2 cores, and three
 * threads sleeping 2 ms in nanosleep, poll and epoll_wait, counting EINTR
 * and early wake-ups. A 5 s run traces GBs: many times one buffer.
 *
 *   gcc -O2 -pthread -pg -mfentry -mnop-mcount -mrecord-mcount -fno-pie -c bench/sustained.c -o /tmp/s.o
 *   gcc -no-pie -pthread -o /tmp/sustained /tmp/s.o
 *   textpoke record -o t.data /tmp/sustained 5 && textpoke report -i t.data
 *   uftrace record -P . -d u.data /tmp/sustained 5 && uftrace report -d u.data
 *
 * The program prints its own counts; the trace's top/mid/leaf counts must
 * be exactly calls, 2x and 4x, with 0 lost, and eintr = early = 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/epoll.h>
#define F __attribute__((noinline))
static atomic_int stop; static atomic_long calls, eintr, early, sleeps;
F long leaf(long x) { return x * 3 + 1; }
F long mid(long x) { return leaf(x) + leaf(x + 1); }
F long top(long x) { return mid(x) ^ mid(x >> 1); }
static double now(void){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec/1e9; }
static void *worker(void *a){ long s=0,n=0; (void)a; while(!atomic_load(&stop)){ s+=top(n++); } atomic_fetch_add(&calls,n); return (void*)s; }
static void *sleeper(void *a){ long kind=(long)a; int ep=epoll_create1(0);
  while(!atomic_load(&stop)){ double t0=now(); int r;
    if(kind==0){ struct timespec ts={0,2000000}; r=nanosleep(&ts,0); }
    else if(kind==1){ r=poll(0,0,2); }
    else { struct epoll_event e; r=epoll_wait(ep,&e,1,2); }
    double dt=now()-t0; atomic_fetch_add(&sleeps,1);
    if(r<0&&errno==EINTR) atomic_fetch_add(&eintr,1); else if(dt<0.002) atomic_fetch_add(&early,1); }
  return 0; }
int main(int argc,char**argv){ int secs=argc>1?atoi(argv[1]):10; pthread_t w[8],s[3];
  for(long i=0;i<8;i++) pthread_create(&w[i],0,worker,0);
  for(long i=0;i<3;i++) pthread_create(&s[i],0,sleeper,(void*)i);
  struct timespec ts={secs,0}; while(nanosleep(&ts,&ts)<0&&errno==EINTR) atomic_fetch_add(&eintr,1);
  atomic_store(&stop,1); for(int i=0;i<8;i++) pthread_join(w[i],0); for(int i=0;i<3;i++) pthread_join(s[i],0);
  printf("top calls %ld (traced calls %ld: top, 2 mid, 4 leaf each), sleeps %ld, eintr %ld, early %ld\n",calls,calls*7,sleeps,eintr,early); return 0; }
