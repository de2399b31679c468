import os
import sys

# tests/reference holds the float64 references; make it importable as `reference`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
