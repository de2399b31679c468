// effx family: offload runtime, pybind11 classes of the torch-free runtime (effx.offload wraps
// them). Memory crosses as integers (tensor.data_ptr()) and byte counts, so the runtime never
// sees torch; pool blocks come back as buffer-protocol objects that torch.frombuffer views,
// and a block returns to the pool when the last tensor viewing it dies.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "effx/offload.h"

namespace py = pybind11;
using namespace effx::offload;

namespace {

// A span of pool memory. Owned blocks go back to the pool on destruction; views of the
// streamer's host-tier blocks keep the streamer alive instead.
struct PyHostBlock {
  std::shared_ptr<HostPool> pool;
  void* ptr = nullptr;
  size_t nbytes = 0;
  bool owned = false;
  py::object keep;
  ~PyHostBlock() {
    if (owned && ptr) pool->release(ptr);
  }
};

// Holds the pool's shared_ptr so blocks handed out by wait() can outlive the streamer.
struct PyStreamer {
  std::shared_ptr<HostPool> pool;
  std::shared_ptr<DiskStore> disk;
  std::unique_ptr<LayerStreamer> impl;
};

Tier tier_of(int t) {
  if (t < 0 || t > 2) throw std::invalid_argument("effx.offload: tier must be 0 (device), 1 (host) or 2 (disk), got " + std::to_string(t));
  return static_cast<Tier>(t);
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

void register_offload(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  py::register_exception<StoreError>(m, "StoreError", PyExc_RuntimeError);

  py::class_<PyHostBlock, std::shared_ptr<PyHostBlock>>(m, "HostBlock", py::buffer_protocol())
      .def_property_readonly("ptr", [](const PyHostBlock& b) { return reinterpret_cast<uintptr_t>(b.ptr); })
      .def_property_readonly("nbytes", [](const PyHostBlock& b) { return b.nbytes; })
      .def_buffer([](PyHostBlock& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes)}, {static_cast<py::ssize_t>(1)});
      });

  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool")
      .def(py::init<size_t>(), py::arg("budget"))
      .def_property_readonly("budget", &HostPool::budget)
      .def_property_readonly("used", &HostPool::used)
      .def_property_readonly("peak", &HostPool::peak)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def("allocate", [](std::shared_ptr<HostPool> pool, size_t nbytes) {
        void* p = pool->try_allocate(nbytes);
        if (!p)
          throw std::runtime_error("effx.offload.HostPool: " + std::to_string(nbytes) + " bytes do not fit: " +
                                   std::to_string(pool->used()) + " of " + std::to_string(pool->budget()) +
                                   " bytes in use");
        auto b = std::make_shared<PyHostBlock>();
        b->pool = pool;
        b->ptr = p;
        b->nbytes = nbytes;
        b->owned = true;
        return b;
      }, py::arg("nbytes"));

  py::class_<DiskStore, std::shared_ptr<DiskStore>>(m, "DiskStore")
      .def(py::init<std::string, int, bool>(), py::arg("directory"), py::arg("io_threads") = 4, py::arg("direct") = true)
      .def_property_readonly("directory", &DiskStore::directory)
      .def_property_readonly("direct", &DiskStore::direct)
      .def("path_of", &DiskStore::path_of)
      .def("write", [](DiskStore& s, const std::string& name, uintptr_t ptr, size_t nbytes, const std::string& meta) {
        s.write(name, as_ptr(ptr), nbytes, meta);
      }, py::arg("name"), py::arg("ptr"), py::arg("nbytes"), py::arg("meta") = "", release())
      .def("read", [](DiskStore& s, const std::string& name, uintptr_t ptr, size_t capacity) {
        return s.read(name, as_ptr(ptr), capacity).meta;
      }, py::arg("name"), py::arg("ptr"), py::arg("capacity"), release())
      .def("info", [](const DiskStore& s, const std::string& name) {
        BlobInfo i = s.info(name);
        return py::make_tuple(i.nbytes, py::bytes(i.meta));
      }, py::arg("name"))
      .def("remove", &DiskStore::remove)
      .def("contains", &DiskStore::contains)
      .def("evict_cache", &DiskStore::evict_cache, release());

  py::class_<PyStreamer>(m, "LayerStreamer")
      .def(py::init([](std::shared_ptr<HostPool> pool, std::shared_ptr<DiskStore> disk, int cuda_device) {
        auto s = std::make_unique<PyStreamer>();
        s->pool = pool;
        s->disk = disk;
        s->impl = std::make_unique<LayerStreamer>(*pool, disk.get(), cuda_device);
        return s;
      }), py::arg("pool"), py::arg("disk"), py::arg("cuda_device"))
      .def("put", [](PyStreamer& s, int layer, const std::string& name, uintptr_t ptr, size_t nbytes, int tier) {
        s.impl->put(layer, name, as_ptr(ptr), nbytes, tier_of(tier));
      }, release())
      .def("tensors", [](PyStreamer& s, int layer) {
        py::list out;
        for (const auto& t : s.impl->tensors(layer))
          out.append(py::make_tuple(t.name, t.nbytes, static_cast<int>(t.tier), t.staging_offset));
        return out;
      })
      .def_property_readonly("num_layers", [](PyStreamer& s) { return s.impl->num_layers(); })
      .def("staging_bytes", [](PyStreamer& s, int layer) { return s.impl->staging_bytes(layer); })
      .def("host_block", [](py::object self, int layer, const std::string& name) {
        PyStreamer& s = self.cast<PyStreamer&>();
        auto b = std::make_shared<PyHostBlock>();
        b->pool = s.pool;
        b->ptr = const_cast<void*>(s.impl->host_pointer(layer, name));
        if (!b->ptr) throw std::invalid_argument("effx.offload: '" + name + "' of layer " + std::to_string(layer) + " is not on the host tier");
        for (const auto& t : s.impl->tensors(layer))
          if (t.name == name) b->nbytes = t.nbytes;
        b->keep = self;
        return b;
      })
      .def("fetch", [](PyStreamer& s, int layer, const std::vector<uintptr_t>& dsts, uintptr_t stream) {
        std::vector<void*> ptrs;
        for (auto p : dsts) ptrs.push_back(as_ptr(p));
        s.impl->fetch(layer, ptrs, stream);
      }, py::arg("layer"), py::arg("dsts"), py::arg("stream"), release())
      .def("wait", [](PyStreamer& s, int layer, uintptr_t stream) -> py::object {
        void* block;
        {
          py::gil_scoped_release unlocked;
          block = s.impl->wait(layer, stream);
        }
        if (!block) return py::none();
        auto b = std::make_shared<PyHostBlock>();
        b->pool = s.pool;
        b->ptr = block;
        b->nbytes = s.impl->staging_bytes(layer);
        b->owned = true;
        return py::cast(b);
      }, py::arg("layer"), py::arg("stream"))
      .def("pending", [](PyStreamer& s, int layer) { return s.impl->pending(layer); })
      .def("record", [](PyStreamer& s, const std::string& kind, int layer) { s.impl->log().record(kind, layer); })
      .def("events", [](PyStreamer& s) {
        py::list out;
        for (const auto& e : s.impl->log().events()) out.append(py::make_tuple(e.seq, e.kind, e.layer));
        return out;
      })
      .def("wait_event", [](PyStreamer& s, const std::string& kind, int layer, double seconds) {
        return s.impl->log().wait_for(kind, layer, seconds);
      }, release())
      .def("clear_events", [](PyStreamer& s) { s.impl->log().clear(); });

  m.def("offload_place_by_size", [](const std::vector<size_t>& nbytes, double device, double host) {
    std::vector<int> out;
    for (Tier t : place_by_size(nbytes, device, host)) out.push_back(static_cast<int>(t));
    return out;
  });
  m.def("offload_check_percentages", &check_percentages);
  m.def("offload_block_schedule", [](int layers, int batches) {
    py::list out;
    for (const auto& s : block_schedule(layers, batches))
      out.append(py::make_tuple(s.layer, s.batch, s.load_weight_layer, s.load_cache_layer, s.load_cache_batch,
                                s.store_cache_layer, s.store_cache_batch));
    return out;
  });
  m.def("offload_crc32c", [](py::bytes data) {
    std::string s = data;
    return crc32c(s.data(), s.size());
  });
}
