"""Bridges to other training stacks (SparseML recipes). Each module imports its stack lazily."""
