/* llama.cpp's reference quantizers (ggml-quants.c) as a command:
 *
 *     quantize_ref TYPE IN.f32 N OUT.bin
 *
 * quantizes N little-endian f32 values (rows of whole blocks, one after
 * another) to TYPE (q4_0, q4_k or q6_k) with quantize_row_*_ref and writes
 * the ggml blocks. Built and run by scripts/make_quant_fixtures.py.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void quantize_row_q4_0_ref(const float *x, void *y, int64_t k);
void quantize_row_q4_K_ref(const float *x, void *y, int64_t k);
void quantize_row_q6_K_ref(const float *x, void *y, int64_t k);

/* The few ggml symbols ggml-quants.c links against but these paths never
 * call. */
void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
size_t ggml_row_size(int type, int64_t n) { abort(); }
const char *ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s q4_0|q4_k|q6_k IN.f32 N OUT.bin\n", argv[0]);
        return 2;
    }
    long n = atol(argv[3]);
    float *x = malloc(n * sizeof(float));
    unsigned char *q = malloc(n * 2);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(x, sizeof(float), n, f) != (size_t)n) {
        fprintf(stderr, "cannot read %ld floats from %s\n", n, argv[2]);
        return 1;
    }
    fclose(f);
    size_t bytes;
    if (!strcmp(argv[1], "q4_0")) {
        quantize_row_q4_0_ref(x, q, n);
        bytes = n / 32 * 18;
    } else if (!strcmp(argv[1], "q4_k")) {
        quantize_row_q4_K_ref(x, q, n);
        bytes = n / 256 * 144;
    } else if (!strcmp(argv[1], "q6_k")) {
        quantize_row_q6_K_ref(x, q, n);
        bytes = n / 256 * 210;
    } else {
        fprintf(stderr, "unknown type %s\n", argv[1]);
        return 2;
    }
    f = fopen(argv[4], "wb");
    if (!f || fwrite(q, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot write %s\n", argv[4]);
        return 1;
    }
    fclose(f);
    return 0;
}
