"""Shared pytest configuration."""
import os

# Two parties often share this 2-core machine in tests: one torch thread each (DESIGN.md s10).
os.environ.setdefault("OMP_NUM_THREADS", "1")
