"""Loss functions as plain, testable functions and small modules, one idea per file."""
