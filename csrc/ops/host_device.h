#pragma once

// Functions marked CNNOPS_HOST_DEVICE are compiled for both the CPU and the GPU, so the CUDA
// kernels' arithmetic is exercised by the CPU kernels on machines without a GPU.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CNNOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CNNOPS_HOST_DEVICE inline
#endif
