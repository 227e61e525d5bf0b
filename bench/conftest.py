"""The microbenchmarks run under OMP_WAIT_POLICY=PASSIVE, as the edgesparse commands do
(cli.TIMED_COMMANDS); OpenMP reads it when torch loads, before any benchmark module."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
