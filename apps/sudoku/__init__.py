"""Sudoku with solver-order completions and bootstrapped mixed rewards (PAPERS.md section 6)."""
