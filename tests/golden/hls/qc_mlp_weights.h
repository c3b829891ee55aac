// qc_mlp_weights.h: the design's constants as exact integer codes (never decimal text).
// W: 32-bit words; code j of a word sits in bits [b*j, b*j + b) for b-bit codes, in K order.
// S: scale codes (value = code * 2^-scale_frac); Z: zero points; B: bias codes (acc format).
#pragma once
#include <ap_int.h>

// layer0: scale_frac=20, bias fraction bits=16
static const ap_uint<32> layer0_W[16][4] = {
    {0x7889f658, 0xd55c0984, 0x03998101, 0x4afbe230},
    {0x7224e945, 0x4ef6c440, 0xa2136a07, 0x9f869a94},
    {0xb26fa9ab, 0xcc970604, 0x9fd16123, 0x04396c02},
    {0x302b17a6, 0x45fd5567, 0x5607416f, 0x7668a5e4},
    {0xd8096353, 0xf4205f28, 0xc62d8b84, 0xf46d0013},
    {0xcdc0c8fb, 0xa5b759ef, 0xf8869b34, 0xa056ffc9},
    {0xc6a70c3f, 0x5364b857, 0x5cfb8545, 0x36089d5c},
    {0xa2b97c7a, 0xf188506a, 0x2d843af4, 0x140124e3},
    {0xab2b80b2, 0x4c634f2d, 0xa056b586, 0xbc529f45},
    {0xa0f3ae60, 0x0e339b3c, 0x9f051749, 0x76dbb473},
    {0x857f4d56, 0x94526c80, 0x9e7af074, 0x8397d18b},
    {0x07a13825, 0x51f7a509, 0xb4607a45, 0x87c9f5b6},
    {0x90878b80, 0xf2aecebc, 0x67fc7e05, 0xcb96ed9f},
    {0x6c6f48b9, 0x55088c9c, 0x57c99ca7, 0x7893f706},
    {0x68baff76, 0xc08b4c6b, 0x796a7a7f, 0x8c078d7a},
    {0x98cf6f76, 0xb4a44709, 0xa8f9c07d, 0xa5bda8ab},
};
static const ap_int<18> layer0_S[16][2] = {
    {40478, 23037},
    {29754, 38323},
    {43479, 36002},
    {45870, 50040},
    {38298, 34511},
    {44116, 31641},
    {32035, 49046},
    {49918, 28179},
    {35916, 43048},
    {36696, 42307},
    {51745, 28313},
    {56244, 43366},
    {41909, 57174},
    {36476, 52528},
    {59881, 82243},
    {54381, 71662},
};
static const ap_int<5> layer0_Z[16][2] = {
    {7, 6},
    {6, 6},
    {8, 7},
    {6, 6},
    {6, 8},
    {9, 7},
    {7, 9},
    {6, 6},
    {6, 6},
    {6, 6},
    {8, 8},
    {5, 6},
    {10, 10},
    {10, 10},
    {10, 9},
    {8, 10},
};
static const ap_int<24> layer0_B[16] = {-3565, -875, 8506, -6343, 12627, 12316, -11229, -924, 2246, -4986, -4857, -1556, 4844, -3351, 11971, 1900};

// layer1: scale_frac=20, bias fraction bits=16
static const ap_uint<32> layer1_W[8][2] = {
    {0xa9e7bd4a, 0xa8f7045a},
    {0x4666a2af, 0xfaa02612},
    {0x3afa091e, 0x55d9db7e},
    {0x947d8718, 0x55a0d7f7},
    {0x0cb43a43, 0xc2e3f460},
    {0xa34a189f, 0xa09a86b2},
    {0x074fdcfc, 0xd9e1d790},
    {0x49fa5496, 0x5077c2c7},
};
static const ap_int<18> layer1_S[8][1] = {
    {63995},
    {55014},
    {35316},
    {70599},
    {49801},
    {71817},
    {51366},
    {44260},
};
static const ap_int<5> layer1_Z[8][1] = {
    {10},
    {8},
    {9},
    {7},
    {5},
    {8},
    {8},
    {7},
};
static const ap_int<26> layer1_B[8] = {4903, -4497, -4430, 3908, -3921, 5027, 15674, -11050};
