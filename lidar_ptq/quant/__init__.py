"""Quantization primitives: specs, quantizers, observers, fake-quant layers, BN folding."""
