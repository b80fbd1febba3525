"""Routing metrics of the MoE literature, each a function of a trace (see docs/analysis.md)."""
