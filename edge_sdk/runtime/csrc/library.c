/* What this library says of itself: the stamp of the sources it was built from
 * (runtime/kernel_build.py), which the loader checks against the sources beside it. */
#ifndef EDGE_KERNELS_SOURCE
#define EDGE_KERNELS_SOURCE "unstamped"
#endif

const char *edge_kernels_source(void) { return EDGE_KERNELS_SOURCE; }
