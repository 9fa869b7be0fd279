// The AVX2+FMA kernels of the CPU selective scan: selective_scan_cpu.cpp
// compiled a second time with SSMLAB_SS_AVX2_TU, which puts its kernels under
// a target("avx2,fma") pragma (no special compiler flags; only on x86-64 with
// GCC or Clang, elsewhere this file is empty). selective_scan_cpu.cpp picks
// these kernels at run time when the CPU supports AVX2 and FMA.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(SSMLAB_SS_NO_AVX2)
#define SSMLAB_SS_AVX2_TU 1
#include "selective_scan_cpu.cpp"
#endif
