// effx family: offload runtime, the CUDA side (host C++ against the CUDA runtime API; built
// only with EFFX_WITH_CUDA). See csrc/runtime/device_copy.h.
#include "../device_copy.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace effx::offload::device {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("effx.offload: ") + what + " failed: " + cudaGetErrorString(err));
}

}  // namespace

void* pinned_alloc(size_t nbytes) {
  void* p = nullptr;
  // Portable: the pool's blocks are copied to whichever device the engine computes on.
  if (cudaHostAlloc(&p, nbytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error; the caller falls back to pageable memory
    return nullptr;
  }
  return p;
}

void pinned_free(void* p) { cudaFreeHost(p); }

void* stream_create(int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  return s;
}

void stream_destroy(void* stream) { cudaStreamDestroy(static_cast<cudaStream_t>(stream)); }

void* event_create() {
  cudaEvent_t e;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return e;
}

void event_destroy(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

void event_record(void* event, void* stream) {
  check(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)), "cudaEventRecord");
}

void event_synchronize(void* event) {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

void stream_wait_event(void* stream, void* event) {
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0),
        "cudaStreamWaitEvent");
}

void copy_to_device_async(void* dst, const void* src, size_t nbytes, void* stream) {
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)),
        "cudaMemcpyAsync");
}

void set_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

}  // namespace effx::offload::device
