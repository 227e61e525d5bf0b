// Loading an exported model (manifest, weights, kernels) and running it.
//
// Products (linear, conv2d) run the exported TVM kernels through tvm-ffi: the library's
// functions are tvm::ffi::Functions called with DLTensor views of our own buffers, so no
// array is copied on a call. im2col, ReLU, pooling, flatten and add are plain loops here.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "edgesparse/runtime.h"

namespace edgesparse {
namespace {

namespace ffi = tvm::ffi;
using JObject = ffi::Map<ffi::Any, ffi::Any>;
using JArray = ffi::Array<ffi::Any>;

constexpr int64_t kSchemaVersion = 1;
// The forward kernel's parameters (edgesparse/kernels/tvm/_block_rows.py), in call order:
// row_base and col_off serve its gathered (implicit im2col) build only, and ids its
// indirect one; exported kernels are neither, so those get one-element placeholders.
const std::vector<std::string> kKernelArgs = {"inp", "row_base", "col_off", "V", "off", "idx", "ids", "bias", "out"};

// Typed access to the manifest's JSON, each failure naming the field ("layers[2].block").
class Json {
 public:
  Json(ffi::Any value, std::string where, const std::string& file) : value_(std::move(value)), where_(std::move(where)), file_(file) {}
  Json operator[](const std::string& key) const {
    JObject obj = Object();
    ffi::String k(key);
    if (!obj.count(k)) Fail("has no field \"" + key + "\"", where_);
    return Json(obj.at(k), where_.empty() ? key : where_ + "." + key, file_);
  }
  Json operator[](size_t i) const { return Json(List()[static_cast<int64_t>(i)], where_ + "[" + std::to_string(i) + "]", file_); }
  bool IsNull() const { return value_ == nullptr; }
  int64_t Int() const {
    if (auto v = value_.as<int64_t>()) return *v;
    Fail("must be an integer");
  }
  std::string Str() const {
    if (auto v = value_.as<ffi::String>()) return std::string(*v);
    Fail("must be a string");
  }
  size_t Size() const { return List().size(); }
  // A list of ints; `length` >= 0 requires that many, `positive` requires each > 0.
  std::vector<int64_t> Ints(int length = -1, bool positive = true) const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < Size(); ++i) out.push_back((*this)[i].Int());
    bool ok = (length < 0 || static_cast<int>(out.size()) == length) &&
              std::all_of(out.begin(), out.end(), [&](int64_t v) { return positive ? v > 0 : v >= 0; });
    if (!ok) {
      Fail(std::string("must be a list of ") + (length >= 0 ? std::to_string(length) + " " : "") +
           (positive ? "positive" : "non-negative") + " integers");
    }
    return out;
  }
  [[noreturn]] void Fail(const std::string& what) const { Fail(what, where_); }

 private:
  [[noreturn]] void Fail(const std::string& what, const std::string& where) const {
    throw Error("bad manifest " + file_ + ": " + (where.empty() ? "the top level" : where) + " " + what);
  }
  JObject Object() const {
    if (auto v = value_.as<JObject>()) return *v;
    Fail("must be a JSON object");
  }
  JArray List() const {
    if (auto v = value_.as<JArray>()) return *v;
    Fail("must be a JSON list");
  }
  ffi::Any value_;
  std::string where_;
  const std::string& file_;
};

enum class Op { kLinear, kConv2d, kRelu, kMaxPool2d, kFlatten, kAdd, kGlobalAvgPool };

// An array in memory someone else owns (the weights file's buffer, a Tensor). The
// DLTensor a kernel takes is made per call (ToDL), so a View can be copied and moved freely.
struct View {
  const void* data = nullptr;
  DLDataType dtype{};
  std::vector<int64_t> shape;
};

DLTensor ToDL(const View& v) {
  DLTensor t{};
  t.data = const_cast<void*>(v.data);  // the kernels write only to their output
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = static_cast<int32_t>(v.shape.size());
  t.dtype = v.dtype;
  t.shape = const_cast<int64_t*>(v.shape.data());
  return t;
}

constexpr DLDataType kF32{kDLFloat, 32, 1};
constexpr DLDataType kI32{kDLInt, 32, 1};

struct Layer {
  std::string name;
  Op op;
  std::vector<int64_t> in_shape, out_shape;  // per sample
  std::vector<int> inputs;  // indices of the layers whose outputs it reads; -1: the model's input
  // linear / conv2d: W [n, k] padded to [np, kp] in (bn, bk) blocks.
  ffi::Function kernel;
  int64_t n = 0, k = 0, np = 0, kp = 0;
  View values, offsets, indices, bias;
  // conv2d and max_pool2d: (h, w) pairs.
  std::vector<int64_t> kernel_size, stride, padding, dilation;
};

int64_t Prod(const std::vector<int64_t>& s) {
  int64_t p = 1;
  for (int64_t d : s) p *= d;
  return p;
}

int64_t PooledSize(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot open " + path + ": " + std::strerror(errno));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

struct Model::Impl {
  std::optional<ffi::Module> library;  // optional: ffi::Module has no empty state
  ArrayFile weights;
  std::vector<int64_t> input_shape, output_shape;
  std::vector<Layer> layers;
  std::vector<size_t> last_use;  // per layer, the last layer reading its output (freed after it)
  // One-element placeholders for the arguments an exported kernel does not read.
  float no_bias = 0.0f;
  int32_t no_index = 0;  // ids, row_base and col_off

  void LoadLayer(const Json& j, Layer& layer);
  void RunProduct(const Layer& layer, const float* rows, int64_t count, float* out) const;
  Tensor RunLayer(const Layer& layer, const Tensor& x, const Tensor* y, int64_t batch) const;
};

Model::Model() : impl_(new Impl) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
const std::vector<int64_t>& Model::input_shape() const { return impl_->input_shape; }
const std::vector<int64_t>& Model::output_shape() const { return impl_->output_shape; }

Model Model::Load(const std::string& dir) {
  Model model;
  Impl& m = *model.impl_;
  const std::string manifest_path = dir + "/manifest.json";
  ffi::String parse_error;
  ffi::Any parsed = ffi::json::Parse(ffi::String(ReadText(manifest_path)), &parse_error);
  if (!parse_error.empty()) throw Error("bad manifest " + manifest_path + ": not valid JSON (" + std::string(parse_error) + ")");
  Json root(parsed, "", manifest_path);
  if (root["format"].Str() != "edgesparse-export") root["format"].Fail("must be \"edgesparse-export\"");
  int64_t version = root["schema_version"].Int();
  if (version != kSchemaVersion) {
    root["schema_version"].Fail("is " + std::to_string(version) + "; this runtime reads schema version " + std::to_string(kSchemaVersion));
  }
  if (root["dtype"].Str() != "float32") root["dtype"].Fail("must be \"float32\"");
  std::vector<std::string> kernel_args;
  for (size_t i = 0; i < root["kernel_args"].Size(); ++i) kernel_args.push_back(root["kernel_args"][i].Str());
  if (kernel_args != kKernelArgs) {
    std::string got, want;
    for (const auto& a : kernel_args) got += (got.empty() ? "" : ", ") + a;
    for (const auto& a : kKernelArgs) want += (want.empty() ? "" : ", ") + a;
    root["kernel_args"].Fail("is (" + got + "), but this runtime calls kernels with (" + want +
                             "): export and runtime come from different edgesparse versions");
  }
  m.input_shape = root["input_shape"].Ints();
  m.output_shape = root["output_shape"].Ints();

  const std::string library_path = dir + "/" + root["library"].Str();
  if (!std::ifstream(library_path)) throw Error("cannot open " + library_path + " (the kernel library): " + std::strerror(errno));
  try {
    m.library = ffi::Module::LoadFromFile(ffi::String(library_path));
  } catch (const ffi::Error& err) {
    throw Error("cannot load the kernel library " + library_path + ": " + err.message());
  }
  m.weights = ArrayFile::Read(dir + "/" + root["weights"].Str());

  Json layers = root["layers"];
  if (layers.Size() == 0) layers.Fail("must hold at least one layer");
  std::vector<std::string> names;
  for (size_t i = 0; i < layers.Size(); ++i) {
    Layer layer;
    m.LoadLayer(layers[i], layer);
    Json inputs = layers[i]["inputs"];
    const size_t arity = layer.op == Op::kAdd ? 2 : 1;
    if (inputs.Size() != arity) inputs.Fail("must name " + std::to_string(arity) + " input(s) for this op");
    for (size_t k = 0; k < arity; ++k) {
      const std::string source = inputs[k].Str();
      auto found = std::find(names.begin(), names.end(), source);
      if (source != "input" && found == names.end()) inputs[k].Fail("is '" + source + "', which is neither \"input\" nor an earlier layer");
      const int index = source == "input" ? -1 : static_cast<int>(found - names.begin());
      const std::vector<int64_t>& shape = index < 0 ? m.input_shape : m.layers[index].out_shape;
      if (layer.in_shape != shape) {
        layers[i]["input_shape"].Fail("is " + ShapeString(layer.in_shape) + " but its input '" + source + "' gives " + ShapeString(shape));
      }
      if (index >= 0) m.last_use[index] = i;
      layer.inputs.push_back(index);
    }
    names.push_back(layer.name);
    m.last_use.push_back(i);
    m.layers.push_back(std::move(layer));
  }
  const std::vector<int64_t>& shape = m.layers.back().out_shape;
  if (shape != m.output_shape) {
    root["output_shape"].Fail("is " + ShapeString(m.output_shape) + " but the last layer gives " + ShapeString(shape));
  }
  return model;
}

void Model::Impl::LoadLayer(const Json& j, Layer& layer) {
  layer.name = j["name"].Str();
  layer.in_shape = j["input_shape"].Ints();
  layer.out_shape = j["output_shape"].Ints();
  const std::string op = j["op"].Str();
  std::vector<int64_t> expected_out;
  const auto& in = layer.in_shape;
  if (op == "relu") {
    layer.op = Op::kRelu;
    expected_out = in;
  } else if (op == "flatten") {
    layer.op = Op::kFlatten;
    expected_out = {Prod(in)};
  } else if (op == "add") {
    layer.op = Op::kAdd;
    expected_out = in;
  } else if (op == "global_avg_pool") {
    layer.op = Op::kGlobalAvgPool;
    if (in.size() != 3) j["input_shape"].Fail("must be [C, H, W] for global_avg_pool");
    expected_out = {in[0]};
  } else if (op == "max_pool2d") {
    layer.op = Op::kMaxPool2d;
    layer.kernel_size = j["kernel_size"].Ints(2);
    layer.stride = j["stride"].Ints(2);
    layer.padding = j["padding"].Ints(2, false);
    if (in.size() != 3) j["input_shape"].Fail("must be [C, H, W] for max_pool2d");
    expected_out = {in[0], PooledSize(in[1], layer.kernel_size[0], layer.stride[0], layer.padding[0], 1),
                    PooledSize(in[2], layer.kernel_size[1], layer.stride[1], layer.padding[1], 1)};
  } else if (op == "linear" || op == "conv2d") {
    layer.op = op == "linear" ? Op::kLinear : Op::kConv2d;
    std::vector<int64_t> shape = j["shape"].Ints(2), block = j["block"].Ints(2), padded = j["padded_shape"].Ints(2);
    layer.n = shape[0];
    layer.k = shape[1];
    const int64_t bn = block[0], bk = block[1];
    layer.np = (layer.n + bn - 1) / bn * bn;
    layer.kp = (layer.k + bk - 1) / bk * bk;
    if (padded != std::vector<int64_t>{layer.np, layer.kp}) {
      j["padded_shape"].Fail("must be the shape rounded up to whole blocks, " + ShapeString({layer.np, layer.kp}));
    }
    const int64_t nnz = j["nnz_blocks"].Int(), block_rows = layer.np / bn, block_cols = layer.kp / bk;
    if (nnz < 0 || nnz > block_rows * block_cols) j["nnz_blocks"].Fail("must lie in [0, blocks of the grid]");
    const Array& values = weights.Get(j["values"].Str(), 1, {nnz, bk, bn});
    const Array& offsets = weights.Get(j["row_offsets"].Str(), 2, {block_rows + 1});
    const Array& indices = weights.Get(j["col_indices"].Str(), 2, {nnz});
    // The kernel trusts the index, so a corrupt one must not reach it.
    const int32_t* off = static_cast<const int32_t*>(offsets.data);
    const int32_t* idx = static_cast<const int32_t*>(indices.data);
    for (int64_t r = 0; r < block_rows; ++r) {
      if (off[0] != 0 || off[r + 1] < off[r] || off[block_rows] != nnz) {
        throw Error(weights.path() + ": " + offsets.name + " must start at 0, not decrease and end at nnz_blocks=" + std::to_string(nnz));
      }
    }
    for (int64_t b = 0; b < nnz; ++b) {
      if (idx[b] < 0 || idx[b] >= block_cols) {
        throw Error(weights.path() + ": " + indices.name + " has a block column outside [0, " + std::to_string(block_cols) + ")");
      }
    }
    layer.values = View{values.data, kF32, values.shape};
    layer.offsets = View{offsets.data, kI32, offsets.shape};
    layer.indices = View{indices.data, kI32, indices.shape};
    layer.bias = j["bias"].IsNull() ? View{&no_bias, kF32, {1}}
                                    : View{weights.Get(j["bias"].Str(), 1, {layer.np}).data, kF32, {layer.np}};
    const std::string kernel = j["kernel"].Str();
    ffi::Optional<ffi::Function> fn = (*library)->GetFunction(ffi::String(kernel));
    if (!fn.has_value()) j["kernel"].Fail("names '" + kernel + "', which the kernel library does not hold");
    layer.kernel = *fn;
    if (layer.op == Op::kLinear) {
      if (in.size() != 1 || in[0] != layer.k) j["input_shape"].Fail("must be [" + std::to_string(layer.k) + "] for this linear layer");
      expected_out = {layer.n};
    } else {
      layer.kernel_size = j["kernel_size"].Ints(2);
      layer.stride = j["stride"].Ints(2);
      layer.padding = j["padding"].Ints(2, false);
      layer.dilation = j["dilation"].Ints(2);
      const int64_t c_in = j["in_channels"].Int(), c_out = j["out_channels"].Int();
      if (c_out != layer.n || c_in * layer.kernel_size[0] * layer.kernel_size[1] != layer.k) {
        j["shape"].Fail("must be [out_channels, in_channels*kh*kw]");
      }
      if (in.size() != 3 || in[0] != c_in) j["input_shape"].Fail("must be [" + std::to_string(c_in) + ", H, W] for this conv2d");
      expected_out = {c_out, PooledSize(in[1], layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.dilation[0]),
                      PooledSize(in[2], layer.kernel_size[1], layer.stride[1], layer.padding[1], layer.dilation[1])};
    }
  } else {
    j["op"].Fail("is \"" + op + "\"; expected linear, conv2d, relu, max_pool2d, flatten, add or global_avg_pool");
  }
  if (layer.out_shape != expected_out || std::any_of(expected_out.begin(), expected_out.end(), [](int64_t d) { return d <= 0; })) {
    j["output_shape"].Fail("is " + ShapeString(layer.out_shape) + ", but this layer maps " + ShapeString(in) + " to " + ShapeString(expected_out));
  }
}

// out [count, np] = rows [count, kp] @ W.T + bias, by the layer's kernel.
void Model::Impl::RunProduct(const Layer& layer, const float* rows, int64_t count, float* out) const {
  // Named: a DLTensor points into its View's shape.
  const View in_view{rows, kF32, {count, layer.kp}}, out_view{out, kF32, {count, layer.np}}, placeholder{&no_index, kI32, {1}};
  DLTensor in = ToDL(in_view), result = ToDL(out_view), unused = ToDL(placeholder);
  DLTensor values = ToDL(layer.values), offsets = ToDL(layer.offsets), indices = ToDL(layer.indices), bias = ToDL(layer.bias);
  layer.kernel(&in, &unused, &unused, &values, &offsets, &indices, &unused, &bias, &result);
}

Tensor Model::Run(const Tensor& input) const {
  const Impl& m = *impl_;
  const auto& s = input.shape();
  if (s.size() != m.input_shape.size() + 1 || !std::equal(m.input_shape.begin(), m.input_shape.end(), s.begin() + 1) || s[0] < 1) {
    throw Error("input shape mismatch: the model takes [batch, " + ShapeString(m.input_shape).substr(1) + ", got " + ShapeString(s));
  }
  std::vector<Tensor> outputs(m.layers.size());
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& layer = m.layers[i];
    auto arg = [&](size_t k) -> const Tensor& { return layer.inputs[k] < 0 ? input : outputs[layer.inputs[k]]; };
    outputs[i] = m.RunLayer(layer, arg(0), layer.inputs.size() > 1 ? &arg(1) : nullptr, s[0]);
    for (int source : layer.inputs) {
      if (source >= 0 && m.last_use[source] == i) outputs[source] = Tensor();
    }
  }
  return std::move(outputs.back());
}

// One layer on a batch: x (and y, add's second operand) -> a new tensor.
Tensor Model::Impl::RunLayer(const Layer& layer, const Tensor& x, const Tensor* y, int64_t batch) const {
  std::vector<int64_t> out_shape{batch};
  out_shape.insert(out_shape.end(), layer.out_shape.begin(), layer.out_shape.end());
  Tensor out(out_shape);
  const float* in = x.data();
  float* o = out.data();
  switch (layer.op) {
    case Op::kRelu:
      for (int64_t i = 0; i < x.numel(); ++i) o[i] = in[i] > 0.0f ? in[i] : 0.0f;
      break;
    case Op::kFlatten:
      std::memcpy(o, in, static_cast<size_t>(x.numel()) * sizeof(float));
      break;
    case Op::kAdd:
      for (int64_t i = 0; i < x.numel(); ++i) o[i] = in[i] + y->data()[i];
      break;
    case Op::kGlobalAvgPool: {
      const int64_t pixels = layer.in_shape[1] * layer.in_shape[2];
      for (int64_t bc = 0; bc < batch * layer.in_shape[0]; ++bc) {
        float sum = 0.0f;
        for (int64_t p = 0; p < pixels; ++p) sum += in[bc * pixels + p];
        o[bc] = sum / static_cast<float>(pixels);
      }
      break;
    }
    case Op::kMaxPool2d: {
      const int64_t c = layer.in_shape[0], h = layer.in_shape[1], w = layer.in_shape[2];
      const int64_t oh = layer.out_shape[1], ow = layer.out_shape[2];
      for (int64_t bc = 0; bc < batch * c; ++bc) {
        const float* src = in + bc * h * w;
        float* dst = o + bc * oh * ow;
        for (int64_t oy = 0; oy < oh; ++oy) {
          for (int64_t ox = 0; ox < ow; ++ox) {
            float best = -std::numeric_limits<float>::infinity();  // padding never wins, as in torch
            for (int64_t ky = 0; ky < layer.kernel_size[0]; ++ky) {
              const int64_t iy = oy * layer.stride[0] - layer.padding[0] + ky;
              if (iy < 0 || iy >= h) continue;
              for (int64_t kx = 0; kx < layer.kernel_size[1]; ++kx) {
                const int64_t ix = ox * layer.stride[1] - layer.padding[1] + kx;
                if (ix >= 0 && ix < w) best = std::max(best, src[iy * w + ix]);
              }
            }
            dst[oy * ow + ox] = best;
          }
        }
      }
      break;
    }
    case Op::kLinear: {
      const float* rows = in;
      Tensor padded;
      if (layer.kp != layer.k) {  // the kernel reads whole block columns: zero-pad K
        padded = Tensor({batch, layer.kp});
        for (int64_t b = 0; b < batch; ++b) {
          std::memcpy(padded.data() + b * layer.kp, in + b * layer.k, layer.k * sizeof(float));
          std::fill(padded.data() + b * layer.kp + layer.k, padded.data() + (b + 1) * layer.kp, 0.0f);
        }
        rows = padded.data();
      }
      if (layer.np == layer.n) {
        RunProduct(layer, rows, batch, o);
      } else {  // cut the padded output rows of W back
        Tensor full({batch, layer.np});
        RunProduct(layer, rows, batch, full.data());
        for (int64_t b = 0; b < batch; ++b) std::memcpy(o + b * layer.n, full.data() + b * layer.np, layer.n * sizeof(float));
      }
      break;
    }
    case Op::kConv2d: {
      // im2col: one row per output pixel, columns (c, ky, kx) as weight.reshape(C_out, -1).
      const int64_t c = layer.in_shape[0], h = layer.in_shape[1], w = layer.in_shape[2];
      const int64_t oh = layer.out_shape[1], ow = layer.out_shape[2], pixels = oh * ow;
      const int64_t kh = layer.kernel_size[0], kw = layer.kernel_size[1];
      Tensor rows({batch * pixels, layer.kp});
      for (int64_t b = 0; b < batch; ++b) {
        const float* img = in + b * c * h * w;
        for (int64_t oy = 0; oy < oh; ++oy) {
          for (int64_t ox = 0; ox < ow; ++ox) {
            float* row = rows.data() + ((b * oh + oy) * ow + ox) * layer.kp;
            for (int64_t ci = 0; ci < c; ++ci) {
              for (int64_t ky = 0; ky < kh; ++ky) {
                const int64_t iy = oy * layer.stride[0] - layer.padding[0] + ky * layer.dilation[0];
                for (int64_t kx = 0; kx < kw; ++kx) {
                  const int64_t ix = ox * layer.stride[1] - layer.padding[1] + kx * layer.dilation[1];
                  const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
                  *row++ = inside ? img[(ci * h + iy) * w + ix] : 0.0f;
                }
              }
            }
            std::fill(row, row + (layer.kp - layer.k), 0.0f);
          }
        }
      }
      Tensor product({batch * pixels, layer.np});
      RunProduct(layer, rows.data(), batch * pixels, product.data());
      for (int64_t b = 0; b < batch; ++b) {  // [B, L, np] -> [B, C_out, oh, ow]
        for (int64_t p = 0; p < pixels; ++p) {
          const float* src = product.data() + (b * pixels + p) * layer.np;
          for (int64_t co = 0; co < layer.n; ++co) o[(b * layer.n + co) * pixels + p] = src[co];
        }
      }
      break;
    }
  }
  return out;
}

}  // namespace edgesparse
