// Process-wide settings of the native kernels: how many threads they use.
#pragma once

namespace offload::native {

// Threads (including the caller) that each kernel call may use. Starts the pool if it is not running.
int num_threads();

// Sets the thread count for later calls (>= 1; the bindings check). Waits for a running call to finish.
void set_num_threads(int nthreads);

}  // namespace offload::native
