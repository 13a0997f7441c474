/* The shared int8 rule (quantize.h), in plain float32 arithmetic. */
#include <math.h>
#include <string.h>

#include "quantize.h"

EXACT_FLOAT_FUNCTION float edge_quantize_row(const float *x, int n, signed char *codes, int *sum) {
    EXACT_FLOAT
    /* The largest magnitude as the largest bit pattern without the sign (IEEE floats of one sign
     * order as their bits): an integer reduction, which the compiler vectorizes without fast math. */
    unsigned top_bits = 0;
    for (int i = 0; i < n; i++) {
        unsigned bits;
        memcpy(&bits, x + i, sizeof bits);
        bits &= 0x7fffffffu;
        top_bits = bits > top_bits ? bits : top_bits;
    }
    float top;
    memcpy(&top, &top_bits, sizeof top);
    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
    int total = 0;
    for (int i = 0; i < n; i++) total += codes[i] = (signed char)rintf(x[i] * inverse);
    if (sum) *sum = total;
    return top / 127.0f;
}
