// effx family: offload runtime. The CUDA calls of the runtime (pinned host memory, the copy
// stream, events), implemented in csrc/runtime/cuda/device_copy.cpp, which is compiled only in
// the CUDA build (EFFX_WITH_CUDA). Handles are opaque pointers so this header needs no CUDA
// header; every function throws std::runtime_error naming the failed CUDA call.
#pragma once

#include <cstddef>

namespace effx::offload::device {

// Page-locked host memory, or nullptr when no device can pin it (e.g. no GPU present).
void* pinned_alloc(size_t nbytes);
void pinned_free(void* p);

void* stream_create(int device);
void stream_destroy(void* stream);
void* event_create();
void event_destroy(void* event);
void event_record(void* event, void* stream);
void event_synchronize(void* event);
void stream_wait_event(void* stream, void* event);
void copy_to_device_async(void* dst, const void* src, size_t nbytes, void* stream);
void set_device(int device);

}  // namespace effx::offload::device
