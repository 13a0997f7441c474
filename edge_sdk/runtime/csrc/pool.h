/* The threads the kernels of this library share: a small pool that sleeps between calls, or,
 * where the kernels make up a step, spins briefly first, for the next call of the same step (ONNX
 * Runtime's own threads run the rest of a step; threads spinning on would steal their cores). */
#ifndef EDGE_POOL_H
#define EDGE_POOL_H

/* Runs task(context) on `threads` threads, the caller's among them, and returns once each has
 * returned. The task shares out its own work (units taken from an atomic counter), so a helper
 * that wakes late finds less or none left. While another call holds the pool (another thread of
 * the process in a kernel at the same moment), the caller runs the task alone. */
__attribute__((visibility("hidden"))) void edge_pool_run(void (*task)(void *), void *context, int threads);

/* Whether the pool's threads spin 0.2 ms after a call before they sleep (off until set; the
 * process's setting, for every caller). Exported: the backend sets it. */
void edge_pool_set_spin(int spin);

#endif
