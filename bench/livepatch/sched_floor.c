// The scheduling floor of a live-patch transition on busy threads: the time
// from an instant until each of N spinning threads has run at least once
// (its counter moved). A thread that is running (not blocked in a system
// call) cannot be checked from outside without a signal (DESIGN rule 9),
// so it switches itself, in a stub or a checkpoint: no transition on N
// busy threads can complete sooner than this. bench/livepatch/run.sh runs
// it beside `textpoke patch` (FLOOR=1); by hand:
//   gcc -O2 -pthread -o sched_floor bench/livepatch/sched_floor.c && ./sched_floor 8 50
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
static _Atomic unsigned long cnt[64];
static int n;
static void *spin(void *a){ long i=(long)a; for(;;) atomic_fetch_add_explicit(&cnt[i],1,memory_order_relaxed); return 0; }
static double now(){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e3+t.tv_nsec/1e6; }
static int cmp(const void*a,const void*b){ double x=*(double*)a,y=*(double*)b; return x<y?-1:x>y; }
int main(int argc,char**argv){ n=argc>1?atoi(argv[1]):8; int R=argc>2?atoi(argv[2]):50;
  pthread_t t; for(long i=0;i<n;i++) pthread_create(&t,0,spin,(void*)i);
  usleep(100000); double r[1000];
  for(int k=0;k<R;k++){ unsigned long s[64]; for(int i=0;i<n;i++) s[i]=cnt[i]; double t0=now();
    for(;;){ int all=1; for(int i=0;i<n;i++) if(cnt[i]==s[i]) { all=0; break; } if(all) break; }
    r[k]=now()-t0; usleep(20000); }
  qsort(r,R,sizeof r[0],cmp); printf("threads=%d runs=%d median=%.2f ms min=%.2f max=%.2f\n",n,R,r[R/2],r[0],r[R-1]); }
