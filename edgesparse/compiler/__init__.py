"""Target detection and compilation support for the TVM kernels."""
