"""Small reference models used by the benchmarks and tests (not part of the quantization API)."""
