// Autograd of the compiled ops, for every device at once (the Autograd key sits
// above the CPU and CUDA kernels). Each forward op saves its operands and its
// output; its backward is the backend's backward op, called through the
// dispatcher, and returns only the gradients that are needed. The backward ops
// refuse double backward with a clear error.
//
// Why C++ and not torch.library.register_autograd: the Python formula costs
// two Python autograd.Function applications and the backward op's wrapper in
// interpreter time per forward+backward (a visible share of a small training
// step; docs/cpu_kernels.md); this costs a few microseconds. torch.compile
// traces it like any C++ autograd kernel, with the fake kernels registered in
// stccl_ops/_registrations.py; the Functions are marked
// traceable, so compiled autograd also traces their backward (it reads only
// the saved variables and saved_data) instead of breaking its graph there.
#include <memory>
#include <type_traits>

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "op_namespace.h"
#include "ops.h"
#include "window.h"

namespace stccl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
                              double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&,
                                                       int64_t, int64_t, bool, double, bool, bool);
using SelfForwardSig = at::Tensor(const at::Tensor&, int64_t, int64_t, bool, double);
using SelfBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   int64_t, bool, double);
using TemporalForwardSig = at::Tensor(const at::Tensor&, int64_t, int64_t, bool, double, int64_t);
using TemporalBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       int64_t, int64_t, bool, double, int64_t);
using SpatiotemporalForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, bool, double);
using SpatiotemporalBackwardSig = at::Tensor(const std::optional<at::Tensor>&,
                                             const std::optional<at::Tensor>&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, int64_t,
                                             int64_t, int64_t, int64_t, int64_t, bool, double);

// The ops, each looked up in the dispatcher once, for the Functions' forward
// and backward and the backward ops' own autograd kernels.
const auto& local_forward_op() {
  static const auto op = find_op<ForwardSig>(STCCL_OP_NAME("local_correlation"));
  return op;
}
const auto& local_backward_op() {
  static const auto op = find_op<BackwardSig>(STCCL_OP_NAME("_local_correlation_backward"));
  return op;
}
const auto& self_forward_op() {
  static const auto op = find_op<SelfForwardSig>(STCCL_OP_NAME("self_correlation"));
  return op;
}
const auto& self_backward_op() {
  static const auto op = find_op<SelfBackwardSig>(STCCL_OP_NAME("_self_correlation_backward"));
  return op;
}
const auto& temporal_forward_op() {
  static const auto op = find_op<TemporalForwardSig>(STCCL_OP_NAME("temporal_correlation"));
  return op;
}
const auto& temporal_backward_op() {
  static const auto op =
      find_op<TemporalBackwardSig>(STCCL_OP_NAME("_temporal_correlation_backward"));
  return op;
}

const auto& spatiotemporal_forward_op() {
  static const auto op =
      find_op<SpatiotemporalForwardSig>(STCCL_OP_NAME("spatiotemporal_correlation"));
  return op;
}
const auto& spatiotemporal_backward_op() {
  static const auto op = find_op<SpatiotemporalBackwardSig>(
      STCCL_OP_NAME("_spatiotemporal_correlation_backward"));
  return op;
}

void save_window(AutogradContext* ctx, const Window& w) {
  ctx->saved_data["kernel_size"] = w.kernel_size;
  ctx->saved_data["dilation"] = w.dilation;
  ctx->saved_data["normalize"] = w.normalize;
  ctx->saved_data["eps"] = w.eps;
}

Window saved_window(AutogradContext* ctx) {
  return {ctx->saved_data["kernel_size"].toInt(), ctx->saved_data["dilation"].toInt(),
          ctx->saved_data["normalize"].toBool(), ctx->saved_data["eps"].toDouble()};
}

// The gradient slots of a forward op's arguments after its tensors: none.
variable_list with_no_grads_for(variable_list grads, size_t non_tensor_arguments) {
  grads.resize(grads.size() + non_tensor_arguments);
  return grads;
}

class LocalCorrelation : public torch::autograd::Function<LocalCorrelation> {
 public:
  static constexpr bool is_traceable = true;  // see the top of this file
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            int64_t kernel_size, int64_t dilation, bool normalize, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = local_forward_op().call(a, b, kernel_size, dilation, normalize, eps);
    save_window(ctx, {kernel_size, dilation, normalize, eps});
    ctx->save_for_backward({a, b, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Window w = saved_window(ctx);
    auto [grad_a, grad_b] = local_backward_op().call(
        grad_outputs[0], saved[0], saved[1], saved[2], w.kernel_size, w.dilation, w.normalize,
        w.eps, ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return with_no_grads_for({grad_a, grad_b}, 4);
  }
};

class SelfCorrelation : public torch::autograd::Function<SelfCorrelation> {
 public:
  static constexpr bool is_traceable = true;  // see the top of this file
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t kernel_size,
                            int64_t dilation, bool normalize, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = self_forward_op().call(x, kernel_size, dilation, normalize, eps);
    save_window(ctx, {kernel_size, dilation, normalize, eps});
    ctx->save_for_backward({x, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Window w = saved_window(ctx);
    return with_no_grads_for({self_backward_op().call(grad_outputs[0], saved[0], saved[1],
                                                      w.kernel_size, w.dilation,
                                                      w.normalize, w.eps)},
                             4);
  }
};

class TemporalCorrelation : public torch::autograd::Function<TemporalCorrelation> {
 public:
  static constexpr bool is_traceable = true;  // see the top of this file
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& v, int64_t kernel_size,
                            int64_t dilation, bool normalize, double eps, int64_t frame_stride) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out =
        temporal_forward_op().call(v, kernel_size, dilation, normalize, eps, frame_stride);
    save_window(ctx, {kernel_size, dilation, normalize, eps});
    ctx->saved_data["frame_stride"] = frame_stride;
    ctx->save_for_backward({v, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Window w = saved_window(ctx);
    return with_no_grads_for({temporal_backward_op().call(
                                 grad_outputs[0], saved[0], saved[1], w.kernel_size,
                                 w.dilation, w.normalize, w.eps,
                                 ctx->saved_data["frame_stride"].toInt())},
                             5);
  }
};

class SpatiotemporalCorrelation : public torch::autograd::Function<SpatiotemporalCorrelation> {
 public:
  static constexpr bool is_traceable = true;  // see the top of this file
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v, int64_t kernel_size,
                               int64_t dilation, int64_t temporal_kernel_size,
                               int64_t temporal_dilation, int64_t frame_stride, bool normalize,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [spatial, temporal] = spatiotemporal_forward_op().call(
        v, kernel_size, dilation, temporal_kernel_size, temporal_dilation, frame_stride,
        normalize, eps);
    save_window(ctx, {kernel_size, dilation, normalize, eps});
    ctx->saved_data["temporal_kernel_size"] = temporal_kernel_size;
    ctx->saved_data["temporal_dilation"] = temporal_dilation;
    ctx->saved_data["frame_stride"] = frame_stride;
    ctx->save_for_backward({v, spatial, temporal});
    // A volume that receives no gradient is left out of the backward, not
    // filled with zeros.
    ctx->set_materialize_grads(false);
    return {spatial, temporal};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Window w = saved_window(ctx);
    auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    at::Tensor grad_v;
    if (grad_outputs[0].defined() || grad_outputs[1].defined()) {
      grad_v = spatiotemporal_backward_op().call(
          optional(grad_outputs[0]), optional(grad_outputs[1]), saved[0], saved[1], saved[2],
          w.kernel_size, w.dilation, ctx->saved_data["temporal_kernel_size"].toInt(),
          ctx->saved_data["temporal_dilation"].toInt(), ctx->saved_data["frame_stride"].toInt(),
          w.normalize, w.eps);
    }
    return with_no_grads_for({grad_v}, 7);
  }
};

// A new autograd node as the graph holds it: torch's releases up to 2.11 at
// least hold nodes in std::shared_ptr, 2.14 in c10::intrusive_ptr.
template <typename NodePtr, typename NodeT, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<NodeT>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<NodeT>(std::forward<Args>(args)...);
}

// The outputs of a backward op get a grad_fn that raises when reached: double
// backward is not supported.
template <typename... Inputs>
void refuse_double_backward(std::vector<at::Tensor> grads, const Inputs&... inputs) {
  namespace ag = torch::autograd;
  if (!ag::compute_requires_grad(inputs...)) {
    return;
  }
  auto node = make_node<decltype(ag::Edge::function), ag::Error>(
      "stccl_ops: double backward (the gradient of a correlation's gradient) is not "
      "supported by the compiled backends; use backend='reference' for it");
  node->set_next_edges(ag::collect_next_edges(inputs...));
  ag::set_history(grads, node);
}

at::Tensor local_correlation(const at::Tensor& a, const at::Tensor& b, int64_t kernel_size,
                             int64_t dilation, bool normalize, double eps) {
  return LocalCorrelation::apply(a, b, kernel_size, dilation, normalize, eps);
}

at::Tensor self_correlation(const at::Tensor& x, int64_t kernel_size, int64_t dilation,
                            bool normalize, double eps) {
  return SelfCorrelation::apply(x, kernel_size, dilation, normalize, eps);
}

at::Tensor temporal_correlation(const at::Tensor& v, int64_t kernel_size, int64_t dilation,
                                bool normalize, double eps, int64_t frame_stride) {
  return TemporalCorrelation::apply(v, kernel_size, dilation, normalize, eps, frame_stride);
}

std::tuple<at::Tensor, at::Tensor> _local_correlation_backward(
    const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
    int64_t kernel_size, int64_t dilation, bool normalize, double eps, bool need_grad_a,
    bool need_grad_b) {
  std::tuple<at::Tensor, at::Tensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grads = local_backward_op().call(grad_out, a, b, out, kernel_size, dilation, normalize, eps,
                                     need_grad_a, need_grad_b);
  }
  refuse_double_backward({std::get<0>(grads), std::get<1>(grads)}, grad_out, a, b, out);
  return grads;
}

at::Tensor _self_correlation_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& out, int64_t kernel_size,
                                      int64_t dilation, bool normalize, double eps) {
  at::Tensor grad_x;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_x = self_backward_op().call(grad_out, x, out, kernel_size, dilation, normalize, eps);
  }
  refuse_double_backward({grad_x}, grad_out, x, out);
  return grad_x;
}

at::Tensor _temporal_correlation_backward(const at::Tensor& grad_out, const at::Tensor& v,
                                          const at::Tensor& out, int64_t kernel_size,
                                          int64_t dilation, bool normalize, double eps,
                                          int64_t frame_stride) {
  at::Tensor grad_v;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_v = temporal_backward_op().call(grad_out, v, out, kernel_size, dilation, normalize, eps,
                                         frame_stride);
  }
  refuse_double_backward({grad_v}, grad_out, v, out);
  return grad_v;
}

std::tuple<at::Tensor, at::Tensor> spatiotemporal_correlation(
    const at::Tensor& v, int64_t kernel_size, int64_t dilation, int64_t temporal_kernel_size,
    int64_t temporal_dilation, int64_t frame_stride, bool normalize, double eps) {
  const auto outputs =
      SpatiotemporalCorrelation::apply(v, kernel_size, dilation, temporal_kernel_size,
                                       temporal_dilation, frame_stride, normalize, eps);
  return {outputs[0], outputs[1]};
}

at::Tensor _spatiotemporal_correlation_backward(
    const std::optional<at::Tensor>& grad_spatial, const std::optional<at::Tensor>& grad_temporal,
    const at::Tensor& v, const at::Tensor& spatial, const at::Tensor& temporal,
    int64_t kernel_size, int64_t dilation, int64_t temporal_kernel_size,
    int64_t temporal_dilation, int64_t frame_stride, bool normalize, double eps) {
  at::Tensor grad_v;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_v = spatiotemporal_backward_op().call(grad_spatial, grad_temporal, v, spatial, temporal,
                                               kernel_size, dilation, temporal_kernel_size,
                                               temporal_dilation, frame_stride, normalize, eps);
  }
  const at::Tensor none;
  refuse_double_backward({grad_v}, grad_spatial.value_or(none), grad_temporal.value_or(none), v,
                         spatial, temporal);
  return grad_v;
}

}  // namespace

STCCL_TORCH_LIBRARY_IMPL(Autograd, m) { STCCL_FOR_EACH_OP(STCCL_IMPL_OP) }

}  // namespace stccl
