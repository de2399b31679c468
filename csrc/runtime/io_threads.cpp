// effx family: offload runtime. The I/O threads: a fixed pool running jobs in FIFO order.
#include "effx/offload.h"

namespace effx::offload {

IoThreads::IoThreads(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads; ++i)
    workers_.emplace_back([this] {
      for (;;) {
        std::packaged_task<void()> job;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
          if (jobs_.empty()) return;  // stop_ and drained
          job = std::move(jobs_.front());
          jobs_.pop_front();
        }
        job();  // an exception lands in the job's future
      }
    });
}

IoThreads::~IoThreads() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

std::future<void> IoThreads::submit(std::function<void()> job) {
  std::packaged_task<void()> task(std::move(job));
  auto fut = task.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(task));
  }
  cv_.notify_one();
  return fut;
}

}  // namespace effx::offload
