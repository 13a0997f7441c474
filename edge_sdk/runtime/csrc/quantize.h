/* The int8 rule the kernels of this library share for activations and cached rows: symmetric,
 * the largest magnitude at 127, to nearest with ties to even. */
#ifndef EDGE_QUANTIZE_H
#define EDGE_QUANTIZE_H

/* A function in plain float32 arithmetic, whatever the flags this library is built with (no fused
 * multiply-adds, no reciprocals): EXACT_FLOAT_FUNCTION before it, EXACT_FLOAT first in its body.
 * What a value's code rounds to must not depend on the compiler, so a reference can reproduce it
 * (the attention kernel's tests rebuild each rotated query row's codes). */
#if defined(__clang__)
#define EXACT_FLOAT _Pragma("float_control(precise, on)")
#define EXACT_FLOAT_FUNCTION
#else
#define EXACT_FLOAT
#define EXACT_FLOAT_FUNCTION __attribute__((optimize("no-fast-math", "fp-contract=off")))
#endif

/* x [n] -> codes [n]; returns the scale back to floats (largest magnitude / 127), and the sum of
 * the codes in *sum where given. */
__attribute__((visibility("hidden"))) float edge_quantize_row(const float *x, int n, signed char *codes, int *sum);

#endif
