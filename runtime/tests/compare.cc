// edgesparse-compare <actual.bin> <expected.bin> <max_rel_err>: exit 0 when the two
// arrays have the same shape and max|actual - expected| / max|expected| <= max_rel_err
// (the suite's relative error, tests/_oracle.py); prints the error either way.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "edgesparse/runtime.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fputs("usage: edgesparse-compare <actual.bin> <expected.bin> <max_rel_err>\n", stderr);
    return 2;
  }
  try {
    edgesparse::Tensor actual = edgesparse::ReadTensor(argv[1]), expected = edgesparse::ReadTensor(argv[2]);
    if (actual.shape() != expected.shape()) {
      std::fprintf(stderr, "shape %s, expected %s\n", edgesparse::ShapeString(actual.shape()).c_str(),
                   edgesparse::ShapeString(expected.shape()).c_str());
      return 1;
    }
    double err = 0.0, scale = 0.0;
    for (int64_t i = 0; i < actual.numel(); ++i) {
      if (!std::isfinite(actual.data()[i])) err = INFINITY;  // fmax would skip a NaN
      err = std::fmax(err, std::fabs(static_cast<double>(actual.data()[i]) - expected.data()[i]));
      scale = std::fmax(scale, std::fabs(static_cast<double>(expected.data()[i])));
    }
    const double rel = err / (scale > 0.0 ? scale : 1.0), limit = std::atof(argv[3]);
    std::printf("max relative error %.3g (limit %.3g) over %lld values\n", rel, limit, static_cast<long long>(actual.numel()));
    return rel <= limit && std::isfinite(rel) ? 0 : 1;
  } catch (const std::exception& err) {
    std::fprintf(stderr, "edgesparse-compare: %s\n", err.what());
    return 1;
  }
}
