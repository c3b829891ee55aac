// qc_mlp_tb.cpp: C simulation test bench.
//   qc_mlp_csim INPUTS ROWS OUTPUTS [EXPECTED]
// INPUTS: ROWS x 32 float32 (little-endian, row-major); OUTPUTS: ROWS x
// 8 float64 (the fixed-point outputs, exactly); EXPECTED: the bit-accurate
// model's outputs in the same form. Exit status 1 on any mismatch or protocol error.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "qc_mlp.h"

static std::vector<char> read_file(const char *path) {
    std::vector<char> data;
    FILE *f = std::fopen(path, "rb");
    if (!f) { std::fprintf(stderr, "cannot open %s\n", path); std::exit(2); }
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    std::fclose(f);
    return data;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s INPUTS ROWS OUTPUTS [EXPECTED]\n", argv[0]);
        return 2;
    }
    const long rows = std::atol(argv[2]);
    const std::vector<char> in = read_file(argv[1]);
    if ((long)in.size() != rows * QC_MLP_IN * (long)sizeof(float)) {
        std::fprintf(stderr, "%s: expected %ld rows of %d float32\n", argv[1], rows, QC_MLP_IN);
        return 2;
    }
    const float *x = reinterpret_cast<const float *>(in.data());
    std::vector<double> y(rows * QC_MLP_OUT);
    for (long r = 0; r < rows; r++) {
        hls::stream<qc_mlp_in_t> x_in("x_in");
        hls::stream<qc_mlp_out_t> y_out("y_out");
        for (int k = 0; k < QC_MLP_IN; k++) x_in.write((qc_mlp_in_t)x[r * QC_MLP_IN + k]);
        qc_mlp(x_in, y_out);
        for (int n = 0; n < QC_MLP_OUT; n++) {
            if (y_out.empty()) { std::fprintf(stderr, "row %ld: output %d missing\n", r, n); return 1; }
            y[r * QC_MLP_OUT + n] = y_out.read().to_double();
        }
        if (!x_in.empty() || !y_out.empty()) {
            std::fprintf(stderr, "row %ld: streams not drained\n", r);
            return 1;
        }
    }
    FILE *f = std::fopen(argv[3], "wb");
    if (!f) { std::fprintf(stderr, "cannot write %s\n", argv[3]); return 2; }
    std::fwrite(y.data(), sizeof(double), y.size(), f);
    std::fclose(f);
    if (argc > 4) {
        const std::vector<char> ex = read_file(argv[4]);
        const double *want = reinterpret_cast<const double *>(ex.data());
        if (ex.size() != y.size() * sizeof(double)) { std::fprintf(stderr, "expected: bad size\n"); return 2; }
        long bad = 0;
        for (size_t i = 0; i < y.size(); i++) bad += y[i] != want[i];
        std::printf("%ld rows, %zu outputs, %ld mismatches\n", rows, y.size(), bad);
        return bad ? 1 : 0;
    }
    return 0;
}
