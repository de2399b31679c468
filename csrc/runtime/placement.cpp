// effx family: offload runtime. Placement by cumulative size, the block schedule and the
// event log (SPECS.md section 7).
#include <chrono>
#include <cmath>
#include <sstream>

#include "effx/offload.h"

namespace effx::offload {

const char* tier_name(Tier t) {
  switch (t) {
    case Tier::Device: return "device";
    case Tier::Host: return "host";
    case Tier::Disk: return "disk";
  }
  return "unknown";
}

void check_percentages(double device, double host, const char* what) {
  auto fail = [&](const std::string& why) {
    std::ostringstream msg;
    msg << "effx.offload.Policy: " << what << " " << why;
    throw std::invalid_argument(msg.str());
  };
  if (!std::isfinite(device) || device < 0) fail("device percent must be a number in [0, 100], got " + std::to_string(device));
  if (!std::isfinite(host) || host < 0) fail("host percent must be a number in [0, 100], got " + std::to_string(host));
  if (device + host > 100.0 + 1e-9)
    fail("device + host percent must be at most 100 (disk holds the rest), got " + std::to_string(device) + " + " +
         std::to_string(host) + " = " + std::to_string(device + host));
}

std::vector<Tier> place_by_size(const std::vector<size_t>& nbytes, double device_percent, double host_percent) {
  check_percentages(device_percent, host_percent, "weights");
  double total = 0;
  for (size_t n : nbytes) total += static_cast<double>(n);
  std::vector<Tier> out(nbytes.size(), Tier::Disk);
  double cumulative = 0;
  const double dev = device_percent / 100.0, host = (device_percent + host_percent) / 100.0;
  for (size_t i = 0; i < nbytes.size(); ++i) {
    // The midpoint decides, so a tensor straddling a boundary goes where most of it falls.
    const double mid = total > 0 ? (cumulative + 0.5 * static_cast<double>(nbytes[i])) / total : 0.0;
    cumulative += static_cast<double>(nbytes[i]);
    out[i] = mid < dev ? Tier::Device : mid < host ? Tier::Host : Tier::Disk;
  }
  return out;
}

std::vector<ScheduleStep> block_schedule(int num_layers, int num_gpu_batches) {
  if (num_layers < 1 || num_gpu_batches < 1)
    throw std::invalid_argument("effx.offload.block_schedule: num_layers and num_gpu_batches must be >= 1, got " +
                                std::to_string(num_layers) + " and " + std::to_string(num_gpu_batches));
  std::vector<ScheduleStep> steps;
  steps.reserve(static_cast<size_t>(num_layers) * num_gpu_batches);
  const int n = num_layers * num_gpu_batches;
  for (int j = 0; j < num_layers; ++j) {
    for (int k = 0; k < num_gpu_batches; ++k) {
      const int s = j * num_gpu_batches + k;
      const int next = (s + 1) % n, prev = (s + n - 1) % n;  // wrap to the next / previous token
      ScheduleStep st{};
      st.layer = j;
      st.batch = k;
      // Weights load once per block: layer j+1 streams in during all batches of layer j.
      st.load_weight_layer = k == 0 ? (j + 1) % num_layers : -1;
      st.load_cache_layer = next / num_gpu_batches;
      st.load_cache_batch = next % num_gpu_batches;
      st.store_cache_layer = prev / num_gpu_batches;
      st.store_cache_batch = prev % num_gpu_batches;
      steps.push_back(st);
    }
  }
  return steps;
}

void EventLog::record(const std::string& kind, int layer) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(Event{next_++, kind, layer});
  }
  cv_.notify_all();
}

std::vector<Event> EventLog::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_;
}

bool EventLog::wait_for(const std::string& kind, int layer, double seconds) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] {
    for (const auto& e : events_)
      if (e.kind == kind && e.layer == layer) return true;
    return false;
  });
}

void EventLog::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  events_.clear();
}

}  // namespace effx::offload
