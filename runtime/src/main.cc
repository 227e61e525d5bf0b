// edgesparse-run <dir> <input> <output> [--repeat N]: run an exported model on the input
// array file and write the output array file (formats: edgesparse/export.py).
// --repeat N runs the model N more times after a warm-up and prints the median latency.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "edgesparse/runtime.h"

int main(int argc, char** argv) {
  const char* usage = "usage: edgesparse-run <model dir> <input.bin> <output.bin> [--repeat N]\n";
  int repeat = 0;
  if (argc == 6 && std::string(argv[4]) == "--repeat") {
    char* end = nullptr;
    long n = std::strtol(argv[5], &end, 10);
    if (*end != '\0' || n < 1 || n > 1000000) {
      std::fprintf(stderr, "edgesparse-run: --repeat must be a positive integer, got '%s'\n", argv[5]);
      return 2;
    }
    repeat = static_cast<int>(n);
  } else if (argc != 4) {
    std::fputs(usage, stderr);
    return 2;
  }
  try {
    edgesparse::Model model = edgesparse::Model::Load(argv[1]);
    edgesparse::Tensor input = edgesparse::ReadTensor(argv[2]);
    edgesparse::Tensor output = model.Run(input);
    if (repeat > 0) {
      std::vector<double> ms;
      for (int i = 0; i < repeat; ++i) {
        auto start = std::chrono::steady_clock::now();
        output = model.Run(input);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
      std::printf("latency_ms %.6f (median of %d, batch %lld)\n", ms[ms.size() / 2], repeat,
                  static_cast<long long>(input.shape()[0]));
    }
    edgesparse::WriteTensor(argv[3], output);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "edgesparse-run: %s\n", err.what());
    return 1;
  }
  return 0;
}
