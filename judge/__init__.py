"""Evaluation jobs on the bus: MT-bench-style LLM-as-a-judge (single grading and pairwise with swap)."""
