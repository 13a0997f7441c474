/* The shared thread pool (pool.h): workers sleep on a condition variable between calls. */
#include "pool.h"

#include <pthread.h>
#include <stddef.h>

#define MAX_THREADS 64

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int started;       /* workers alive */
    int slots;         /* helpers this call still takes */
    int busy;          /* helpers that took a slot and have not finished */
    unsigned long generation;
    void (*task)(void *);
    void *context;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL};

/* One call on the pool at a time. */
static pthread_mutex_t pool_in_use = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        if (pool.slots == 0) continue;
        pool.slots--;
        void (*task)(void *) = pool.task;
        void *context = pool.context;
        pthread_mutex_unlock(&pool.lock);
        task(context);
        pthread_mutex_lock(&pool.lock);
        if (--pool.busy == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* A forked child has none of the parent's workers. */
static void forget_workers(void) {
    pthread_mutex_init(&pool_in_use, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = pool.busy = 0;
}

static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_workers); }

void edge_pool_run(void (*task)(void *), void *context, int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, watch_forks);
    threads = threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads <= 1 || pthread_mutex_trylock(&pool_in_use)) {
        task(context);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    while (pool.started < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, NULL)) break;
        pthread_detach(thread);
        pool.started++;
    }
    pool.task = task;
    pool.context = context;
    pool.slots = pool.busy = threads - 1 < pool.started ? threads - 1 : pool.started;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    task(context);
    pthread_mutex_lock(&pool.lock);
    pool.busy -= pool.slots; /* helpers not yet awake when the work ran out: not waited for */
    pool.slots = 0;
    while (pool.busy > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool_in_use);
}
