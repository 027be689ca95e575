/* The SQLite workload of bench/workloads.sh and bench/startup.sh: N threads
   (argv[1], default 4) each insert ROWS rows (argv[2], default 2000) into an
   in-memory database and query them 20 times. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include "sqlite3.h"
static int rows = 2000;
static void *worker(void *arg) {
    long id = (long)arg;
    sqlite3 *db; char *err = 0;
    if (sqlite3_open(":memory:", &db)) { fprintf(stderr, "open\n"); exit(1); }
    sqlite3_exec(db, "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c REAL)", 0, 0, &err);
    sqlite3_exec(db, "BEGIN", 0, 0, 0);
    sqlite3_stmt *ins;
    sqlite3_prepare_v2(db, "INSERT INTO t(b,c) VALUES(?,?)", -1, &ins, 0);
    char buf[64];
    for (int i = 0; i < rows; i++) {
        snprintf(buf, sizeof buf, "row-%ld-%d", id, i);
        sqlite3_bind_text(ins, 1, buf, -1, SQLITE_TRANSIENT);
        sqlite3_bind_double(ins, 2, i * 0.5);
        sqlite3_step(ins); sqlite3_reset(ins);
    }
    sqlite3_finalize(ins);
    sqlite3_exec(db, "COMMIT", 0, 0, 0);
    sqlite3_stmt *q;
    sqlite3_prepare_v2(db, "SELECT count(*), sum(c) FROM t WHERE b LIKE ?", -1, &q, 0);
    double total = 0;
    for (int k = 0; k < 20; k++) {
        snprintf(buf, sizeof buf, "row-%ld-%d%%", id, k);
        sqlite3_bind_text(q, 1, buf, -1, SQLITE_TRANSIENT);
        while (sqlite3_step(q) == SQLITE_ROW) total += sqlite3_column_double(q, 1);
        sqlite3_reset(q);
    }
    sqlite3_finalize(q);
    sqlite3_close(db);
    return (void *)(long)total;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    if (argc > 2) rows = atoi(argv[2]);
    pthread_t t[64];
    for (long i = 0; i < n; i++) pthread_create(&t[i], 0, worker, (void *)i);
    long s = 0;
    for (int i = 0; i < n; i++) { void *r; pthread_join(t[i], &r); s += (long)r; }
    printf("sqlite: %d threads, %d rows each, sum %ld\n", n, rows, s);
    return 0;
}
