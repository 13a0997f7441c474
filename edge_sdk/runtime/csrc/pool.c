/* The shared thread pool (pool.h): workers sleep on a condition variable between calls, after a
 * short spin. Why the spin: on a virtual machine, waking a thread whose core has gone idle took
 * ~80 us (measured on a 2-vCPU host, and 6-20% of the time over 300 us), against 100-1,000 us
 * for one of a decode step's products; the calls of a step come tens of microseconds apart, so
 * a helper still spinning takes the next at once, and the caller waiting for one that is about
 * to finish does not sleep either. Bounded, so that a pool between steps gives its core back
 * (ONNX Runtime's threads, between their nodes, do the same); and only where the caller says the
 * kernels make up the step (edge_pool_set_spin): where ONNX Runtime's matrix products follow a
 * kernel's call, a spinning helper would take a core from its threads. */
#include "pool.h"

#include <pthread.h>
#include <stddef.h>
#include <time.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

#define MAX_THREADS 64
#define SPIN_NS 200000L /* how long a thread spins before it sleeps, where it spins: 0.2 ms */

static int spin_enabled; /* edge_pool_set_spin; read racily by design: a hint */

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

void edge_pool_set_spin(int spin) { __atomic_store_n(&spin_enabled, spin != 0, __ATOMIC_RELAXED); }

static int spin_on(void) { return __atomic_load_n(&spin_enabled, __ATOMIC_RELAXED); }

/* A bounded spin: `while (condition && spinning(&spin))` waits for the condition to clear, up to
 * SPIN_NS. Conditions are read without the lock, a hint only: the caller checks again under it. */
struct spin {
    struct timespec start;
    int turns;
};

static struct spin spin_start(void) {
    struct spin spin = {.turns = 0};
    clock_gettime(CLOCK_MONOTONIC, &spin.start);
    return spin;
}

static int spinning(struct spin *spin) {
    RELAX();
    if (++spin->turns % 64) return 1;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - spin->start.tv_sec) * 1000000000L + (now.tv_nsec - spin->start.tv_nsec) < SPIN_NS;
}

static void *worker(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        if (pool.generation == seen && spin_on()) {
            pthread_mutex_unlock(&pool.lock);
            struct spin spin = spin_start();
            while (__atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen && spinning(&spin)) continue;
            pthread_mutex_lock(&pool.lock);
        }
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        if (pool.slots == 0) continue;
        pool.slots--;
        void (*task)(void *) = pool.task;
        void *context = pool.context;
        pthread_mutex_unlock(&pool.lock);
        task(context);
        pthread_mutex_lock(&pool.lock);
        if (__atomic_sub_fetch(&pool.busy, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&pool.done);
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
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    task(context);
    pthread_mutex_lock(&pool.lock);
    /* helpers not yet awake when the work ran out: not waited for */
    __atomic_sub_fetch(&pool.busy, pool.slots, __ATOMIC_RELAXED);
    pool.slots = 0;
    if (pool.busy > 0 && spin_on()) {
        pthread_mutex_unlock(&pool.lock);
        struct spin spin = spin_start();
        while (__atomic_load_n(&pool.busy, __ATOMIC_ACQUIRE) > 0 && spinning(&spin)) continue;
        pthread_mutex_lock(&pool.lock);
    }
    while (pool.busy > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool_in_use);
}
