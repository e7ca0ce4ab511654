"""Load generation and side-by-side benchmarks against peer MTAs."""
