// effx SIMT emulator: see simt.h.
#pragma once

#include "cuda_runtime_api.h"
