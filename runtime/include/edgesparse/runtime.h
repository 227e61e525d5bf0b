// edgesparse C++ runtime: runs a model written by `edgesparse export` (edgesparse/export.py)
// with no Python. The directory holds manifest.json, weights.bin and kernels.so; the
// array format and the manifest schema are documented in edgesparse/export.py.
#ifndef EDGESPARSE_RUNTIME_H_
#define EDGESPARSE_RUNTIME_H_

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgesparse {

// Every failure (bad manifest, missing file, shape mismatch) is an Error whose message
// names the file or field at fault and what was expected.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A float32 row-major tensor whose data starts on a 64-byte boundary (TVM's kernels may
// use aligned vector loads on buffer starts).
class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::vector<int64_t> shape);
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const { return numel_; }
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  std::unique_ptr<float[], Free> data_;
};

std::string ShapeString(const std::vector<int64_t>& shape);

// One array of a file in the array format (see edgesparse/export.py).
struct Array {
  std::string name;
  uint32_t dtype = 0;  // 1 = float32, 2 = int32
  std::vector<int64_t> shape;
  const void* data = nullptr;  // into ArrayFile's buffer, 64-byte aligned
  int64_t numel() const;
};

// An array file read whole into one aligned buffer; the arrays point into it.
class ArrayFile {
 public:
  static ArrayFile Read(const std::string& path);
  // The array called `name` with this dtype and shape, or an Error saying what differs.
  const Array& Get(const std::string& name, uint32_t dtype, const std::vector<int64_t>& shape) const;
  const std::vector<Array>& arrays() const { return arrays_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::shared_ptr<uint8_t> buffer_;
  std::vector<Array> arrays_;
};

// Reads the first array of `path` (float32) as a Tensor.
Tensor ReadTensor(const std::string& path);
// Writes `tensor` as a one-array file (array name `name`), through a temp file + rename.
void WriteTensor(const std::string& path, const Tensor& tensor, const std::string& name = "output");

// A loaded model: kernels, weights and layer list, checked against each other.
class Model {
 public:
  static Model Load(const std::string& dir);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  // input: [batch, *input_shape()] -> [batch, *output_shape()].
  Tensor Run(const Tensor& input) const;
  const std::vector<int64_t>& input_shape() const;
  const std::vector<int64_t>& output_shape() const;

 private:
  Model();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgesparse

#endif  // EDGESPARSE_RUNTIME_H_
