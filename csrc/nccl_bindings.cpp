// Python bindings of the NCCL domain. Arguments are converted with the GIL held; it is
// released before any call that locks a communicator or may wait.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <utility>

#include "check.hpp"
#include "nccl.hpp"
#include "nccl_detail.hpp"
#include "stream.hpp"

namespace py = pybind11;

namespace pyengine {

namespace {

using CommunicatorClass = py::class_<Communicator, std::shared_ptr<Communicator>>;

// What Python passes for a C++ argument of an op: the same value, except a stream, which
// Python gives as a Stream object or an int handle (converted while the GIL is held).
template <typename T>
struct FromPython {
  using type = T;
  static T convert(T value) { return value; }
};

template <>
struct FromPython<cudaStream_t> {
  using type = py::handle;
  static cudaStream_t convert(py::handle stream) { return stream_from_py(stream); }
};

// Binds one enqueueing op (send, recv, all_reduce, ...) of Communicator: the Python method
// takes the op's arguments (a stream as Stream/int), converts them, then releases the GIL
// for the call itself.
template <typename... Args, typename... Extra>
void def_op(CommunicatorClass& cls, const char* name, void (Communicator::*op)(Args...),
            const Extra&... extra) {
  cls.def(
      name,
      [op](Communicator& c, typename FromPython<Args>::type... args) {
        auto converted = std::make_tuple(FromPython<Args>::convert(args)...);
        py::gil_scoped_release release;
        std::apply([&](auto&... a) { (c.*op)(a...); }, converted);
      },
      extra...);
}

void register_types(py::module_& m) {
  py::enum_<DType>(m, "DType", "Element types understood by Communicator.")
      .value("float32", DType::float32)
      .value("float16", DType::float16)
      .value("bfloat16", DType::bfloat16)
      .value("int32", DType::int32)
      .value("int64", DType::int64)
      .value("uint8", DType::uint8)
      .value("float64", DType::float64);
  py::enum_<RedOp>(m, "RedOp", "Reduction operators.")
      .value("sum", RedOp::sum)
      .value("max", RedOp::max)
      .value("min", RedOp::min)
      .value("prod", RedOp::prod);
  m.def("dtype_size", &dtype_size, py::arg("dtype"), "Bytes per element of a DType.");
}

void register_sets_and_groups(py::module_& m) {
  py::class_<CommSet, std::shared_ptr<CommSet>>(
      m, "CommSet",
      "The communicators of one rank: a failure on any member aborts all of them together.")
      .def(py::init<>())
      .def(
          "abort",
          [](CommSet& s, double timeout_s) {
            py::gil_scoped_release release;
            return abort_now_or_at_group_end(s.members(), timeout_s);
          },
          py::arg("timeout_s"),
          "Abort every member, each on its own thread, waiting at most timeout_s; returns one "
          "line per member whose abort did not return in time or failed (empty: all aborted). "
          "Inside an open NCCL group on this thread the abort happens when the group ends.")
      .def("__len__", [](CommSet& s) {
        py::gil_scoped_release release;
        return s.members().size();
      });

  m.def("group_start", &group_start,
        "Open (or nest) this thread's NCCL group; ops on any communicator are deferred.");
  m.def("group_end", &group_end, py::call_guard<py::gil_scoped_release>(),
        "Close this thread's group; the outermost end enqueues it and polls every communicator "
        "touched until ready (GIL released). On failure every communicator of the touched sets "
        "is aborted and Error names them.");
  m.def("group_depth", &group_depth, "Nesting depth of this thread's open NCCL group (0: none).");
}

void def_ops(CommunicatorClass& cls) {
  def_op(cls, "send", &Communicator::send, py::arg("ptr"), py::arg("count"), py::arg("dtype"),
         py::arg("peer"), py::arg("stream"), py::arg("name") = "");
  def_op(cls, "recv", &Communicator::recv, py::arg("ptr"), py::arg("count"), py::arg("dtype"),
         py::arg("peer"), py::arg("stream"), py::arg("name") = "");
  def_op(cls, "all_reduce", &Communicator::all_reduce, py::arg("send_ptr"), py::arg("recv_ptr"),
         py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("stream"), py::arg("name") = "");
  def_op(cls, "reduce_scatter", &Communicator::reduce_scatter, py::arg("send_ptr"), py::arg("recv_ptr"),
         py::arg("recv_count"), py::arg("dtype"), py::arg("op"), py::arg("stream"), py::arg("name") = "");
  def_op(cls, "broadcast", &Communicator::broadcast, py::arg("send_ptr"), py::arg("recv_ptr"),
         py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("stream"), py::arg("name") = "");
}

void def_wait_and_lifetime(CommunicatorClass& cls) {
  cls.def(
         "wait",
         [](Communicator& c, py::handle target, double timeout_s, const std::string& op,
            const std::string& name, int peer) {
           if (py::isinstance<Event>(target)) {
             cudaEvent_t event = target.cast<Event&>().get();
             py::gil_scoped_release release;
             c.wait_event(event, timeout_s, op, name, peer);
           } else {
             cudaStream_t stream = stream_from_py(target);
             py::gil_scoped_release release;
             c.wait_stream(stream, timeout_s, op, name, peer);
           }
         },
         py::arg("target"), py::arg("timeout_s"), py::arg("op"), py::arg("name") = "",
         py::arg("peer") = -1,
         "Block (GIL released) until `target` (an Event, or a Stream / int stream handle whose "
         "queued work is awaited) completes, polling the async errors of every communicator of "
         "this rank's set. On an error, an abort, or after timeout_s the whole set is aborted "
         "and Error names op, name, this rank and the local `peer` as global ranks.")
      .def(
          "abort",
          [](Communicator& c) {
            // On a thread of its own: ncclCommAbort opens an NCCL group internally, which would
            // nest into a group the caller has open on this thread and be deferred to its end.
            std::vector<std::string> problems;
            {
              py::gil_scoped_release release;
              problems = abort_now_or_at_group_end({c.shared_from_this()}, c.timeout_s());
            }
            PYENGINE_CHECK(problems.empty(), detail::join(problems, "; "));
          },
          "Abort this communicator only, on a helper thread, waiting at most timeout_s "
          "(idempotent; never waits for peers). Error if ncclCommAbort failed or did not return. "
          "Inside an open NCCL group on this thread the abort happens when the group ends.")
      .def("destroy", &Communicator::destroy, py::call_guard<py::gil_scoped_release>(),
           "Flush outstanding work (bounded by timeout_s, else the set is aborted and Error "
           "raised), then free; idempotent.");
}

void def_properties(CommunicatorClass& cls) {
  cls.def("async_error", &Communicator::async_error, py::call_guard<py::gil_scoped_release>(),
          "None while healthy, else the decoded asynchronous NCCL error.")
      .def_property_readonly("rank", &Communicator::rank, "Local (NCCL) index of this member.")
      .def_property_readonly("nranks", &Communicator::nranks)
      .def_property_readonly("device", &Communicator::device)
      .def_property_readonly("timeout_s", &Communicator::timeout_s)
      .def_property_readonly("ranks", &Communicator::global_ranks,
                             "Global rank of each member, in communicator order.")
      .def_property_readonly("global_rank", &Communicator::global_rank)
      .def_property_readonly("label", &Communicator::label)
      .def_property_readonly("comm_set", &Communicator::set)
      .def_property_readonly("alive", [](Communicator& c) {
        py::gil_scoped_release release;
        return c.alive();
      });
}

}  // namespace

void register_nccl(py::module_& m) {
  register_types(m);
  register_sets_and_groups(m);
  CommunicatorClass cls(m, "Communicator",
                        "A non-blocking NCCL communicator. Call destroy() or abort() explicitly.");
  cls.def_static(
         "unique_id", [] { return py::bytes(Communicator::unique_id()); },
         "128 opaque bytes to share with every rank before constructing (host only, no GPU).")
      .def(py::init([](py::bytes unique_id, int nranks, int rank, int device, double timeout_s,
                       std::optional<std::vector<int>> ranks, std::shared_ptr<CommSet> comm_set) {
             std::string id(unique_id);
             py::gil_scoped_release release;
             return Communicator::create(id, nranks, rank, device, timeout_s,
                                         ranks.value_or(std::vector<int>{}), std::move(comm_set));
           }),
           py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"),
           py::arg("timeout_s") = 60.0, py::arg("ranks") = py::none(),
           py::arg("comm_set") = py::none());
  def_ops(cls);
  def_wait_and_lifetime(cls);
  def_properties(cls);
}

}  // namespace pyengine
