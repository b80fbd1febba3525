"""Compression of MoE experts: pruning, merging, decomposition, quantization, distillation (DESIGN.md)."""
