// The array format of edgesparse/export.py: reading, writing, and the aligned Tensor.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "edgesparse/runtime.h"

namespace edgesparse {
namespace {

constexpr size_t kAlign = 64;
constexpr char kMagic[4] = {'E', 'S', 'A', 'R'};
constexpr uint32_t kVersion = 1;

void* AlignedAlloc(size_t bytes) {
  size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
  if (p == nullptr) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
  return p;
}

const char* DTypeName(uint32_t dtype) {
  return dtype == 1 ? "float32" : dtype == 2 ? "int32" : "unknown dtype";
}

// Reads little-endian fields from the buffer, failing with the file's name when it ends early.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : data_(data), size_(size), path_(path) {}
  template <typename T>
  T Take(const char* what) {
    Need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));  // x86-64 and aarch64 are little-endian
    pos_ += sizeof(T);
    return value;
  }
  const uint8_t* Skip(size_t bytes, const char* what) {
    Need(bytes, what);
    const uint8_t* p = data_ + pos_;
    pos_ += bytes;
    return p;
  }
  void AlignTo(size_t align) { pos_ = std::min(size_, (pos_ + align - 1) / align * align); }

 private:
  void Need(size_t bytes, const char* what) const {
    if (pos_ + bytes > size_) {
      throw Error(path_ + ": truncated array file (it ends inside the " + what + " at byte " + std::to_string(pos_) + ")");
    }
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

}  // namespace

void Tensor::Free::operator()(float* p) const { std::free(p); }

Tensor::Tensor(std::vector<int64_t> shape) : shape_(std::move(shape)), numel_(1) {
  for (int64_t d : shape_) numel_ *= d;
  data_.reset(static_cast<float*>(AlignedAlloc(static_cast<size_t>(numel_) * sizeof(float))));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

int64_t Array::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

ArrayFile ArrayFile::Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error("cannot open " + path + ": " + std::strerror(errno));
  size_t size = static_cast<size_t>(in.tellg());
  ArrayFile file;
  file.path_ = path;
  file.buffer_.reset(static_cast<uint8_t*>(AlignedAlloc(size)), [](uint8_t* p) { std::free(p); });
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(file.buffer_.get()), static_cast<std::streamsize>(size))) {
    throw Error("cannot read " + path);
  }
  Cursor cur(file.buffer_.get(), size, path);
  const uint8_t* magic = cur.Skip(4, "header");
  if (std::memcmp(magic, kMagic, 4) != 0) throw Error(path + " is not an edgesparse array file (no ESAR magic)");
  uint32_t version = cur.Take<uint32_t>("header");
  if (version != kVersion) {
    throw Error(path + ": array format version " + std::to_string(version) + ", this runtime reads version 1");
  }
  uint32_t count = cur.Take<uint32_t>("header");
  cur.Take<uint32_t>("header");
  for (uint32_t i = 0; i < count; ++i) {
    Array a;
    uint32_t length = cur.Take<uint32_t>("array header");
    const uint8_t* name = cur.Skip(length, "array name");
    a.name.assign(reinterpret_cast<const char*>(name), length);
    a.dtype = cur.Take<uint32_t>("array header");
    if (a.dtype != 1 && a.dtype != 2) {
      throw Error(path + ": array '" + a.name + "' has dtype code " + std::to_string(a.dtype) + " (expected 1 = float32 or 2 = int32)");
    }
    uint32_t ndim = cur.Take<uint32_t>("array header");
    if (ndim > 8) throw Error(path + ": array '" + a.name + "' claims " + std::to_string(ndim) + " dimensions");
    for (uint32_t d = 0; d < ndim; ++d) {
      int64_t dim = cur.Take<int64_t>("array dims");
      if (dim < 0) throw Error(path + ": array '" + a.name + "' has a negative dimension");
      a.shape.push_back(dim);
    }
    cur.AlignTo(kAlign);
    a.data = cur.Skip(static_cast<size_t>(a.numel()) * 4, "array data");
    file.arrays_.push_back(std::move(a));
  }
  return file;
}

const Array& ArrayFile::Get(const std::string& name, uint32_t dtype, const std::vector<int64_t>& shape) const {
  for (const Array& a : arrays_) {
    if (a.name != name) continue;
    if (a.dtype != dtype || a.shape != shape) {
      throw Error(path_ + ": array '" + name + "' is " + DTypeName(a.dtype) + " " + ShapeString(a.shape) +
                  ", the manifest expects " + DTypeName(dtype) + " " + ShapeString(shape));
    }
    return a;
  }
  throw Error(path_ + " has no array '" + name + "' (named in the manifest)");
}

Tensor ReadTensor(const std::string& path) {
  ArrayFile file = ArrayFile::Read(path);
  if (file.arrays().size() != 1) {
    throw Error(path + ": an input file holds exactly one array, found " + std::to_string(file.arrays().size()));
  }
  const Array& a = file.arrays()[0];
  if (a.dtype != 1) throw Error(path + ": the input must be float32, got " + DTypeName(a.dtype));
  Tensor t(a.shape);
  std::memcpy(t.data(), a.data, static_cast<size_t>(t.numel()) * sizeof(float));
  return t;
}

void WriteTensor(const std::string& path, const Tensor& tensor, const std::string& name) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write " + tmp + ": " + std::strerror(errno));
    auto put = [&out](const void* p, size_t n) { out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); };
    uint32_t header[3] = {kVersion, 1, 0};
    put(kMagic, 4);
    put(header, sizeof(header));
    uint32_t fields[3] = {static_cast<uint32_t>(name.size()), 0, 0};
    put(&fields[0], 4);
    put(name.data(), name.size());
    fields[1] = 1;  // float32
    fields[2] = static_cast<uint32_t>(tensor.shape().size());
    put(&fields[1], 8);
    put(tensor.shape().data(), tensor.shape().size() * sizeof(int64_t));
    static const char zeros[kAlign] = {};
    put(zeros, (kAlign - static_cast<size_t>(out.tellp()) % kAlign) % kAlign);
    put(tensor.data(), static_cast<size_t>(tensor.numel()) * sizeof(float));
    if (!out) throw Error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
}

}  // namespace edgesparse
