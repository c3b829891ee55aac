// layer2: conv 3x3, 4 -> 4 channels, groups 1, stride 1x1, dilation 1x1, pads 1,1,1,1; 5x5 -> 5x5.
// Line buffer of 3 zero-padded rows of (x - 4); PE=4 output channels x SIMD=18 taps per cycle;
// dyadic requantization with the residual stream added before the one rounding, clamp to [0, 255].
static void layer2(hls::stream<ap_uint<8>> &x_in, hls::stream<ap_uint<8>> &r_in, hls::stream<ap_uint<8>> &y_out) {
#pragma HLS ARRAY_PARTITION variable=layer2_W type=cyclic factor=4 dim=1
#pragma HLS ARRAY_PARTITION variable=layer2_W type=cyclic factor=18 dim=2
#pragma HLS ARRAY_PARTITION variable=layer2_B type=cyclic factor=4 dim=1
#pragma HLS ARRAY_PARTITION variable=layer2_M type=cyclic factor=4 dim=1
#pragma HLS ARRAY_PARTITION variable=layer2_S type=cyclic factor=4 dim=1
    static ap_int<9> lb[3][7][4];
#pragma HLS ARRAY_PARTITION variable=lb type=complete dim=1
#pragma HLS ARRAY_PARTITION variable=lb type=cyclic factor=18 dim=3
    int oh = 0;
layer2_rows:
    for (int r = 0; r < 7; r++) {
        const int slot = r % 3;
    layer2_fill:
        for (int col = 0; col < 7; col++) {
            for (int ch = 0; ch < 4; ch++) {
#pragma HLS PIPELINE II=1
                const bool inside = r >= 1 && r < 6 && col >= 1 && col < 6;
                lb[slot][col][ch] = inside ? (ap_int<9>)((int)x_in.read() - 4) : (ap_int<9>)0;
            }
        }
        if (r < 2 || (r - 2) % 1 != 0 || oh >= 5) continue;
        const int top = r - 2;  // first padded row of this output row's windows
    layer2_cols:
        for (int ow = 0; ow < 5; ow++) {
        layer2_tiles:
            for (int m0 = 0; m0 < 4; m0 += 4) {
                ap_int<32> acc[4];
#pragma HLS ARRAY_PARTITION variable=acc type=complete
                for (int p = 0; p < 4; p++) {
#pragma HLS UNROLL
                    acc[p] = layer2_B[m0 + p];
                }
            layer2_macs:
                for (int k0 = 0; k0 < 36; k0 += 18) {
#pragma HLS PIPELINE II=1
                    for (int p = 0; p < 4; p++) {
#pragma HLS UNROLL
                        const int g = (m0 + p) / 4;
                        for (int s = 0; s < 18; s++) {
#pragma HLS UNROLL
                            const int k = k0 + s;
                            const int kh = k / 12, kw = (k / 4) % 3, ch = k % 4;
                            acc[p] += layer2_W[m0 + p][k] * lb[(top + kh * 1) % 3][ow * 1 + kw * 1][g * 4 + ch];
                        }
                    }
                }
            layer2_requant:
                for (int p = 0; p < 4; p++) {
#pragma HLS PIPELINE II=1
                    const int m = m0 + p;
                    const ap_int<64> v = (ap_int<64>)acc[p] * layer2_M[m];
                    const ap_int<64> rv = (ap_int<64>)((int)r_in.read() - 8) * 1503238528;
                    const int f = layer2_F[m];
                    ap_int<64> q = qc_rshift(qc_rshift(v, layer2_S[m] - f) + qc_rshift(rv, 31 - f), f);
                    q += 0;
                    if (q < 0) q = 0;
                    if (q > 255) q = 255;
                    y_out.write((ap_uint<8>)q);
                }
            }
        }
        oh++;
    }
}
