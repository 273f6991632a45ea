"""Entry point, so that `python benchmarks/knowledge_injection ...` and `python -m benchmarks.knowledge_injection ...`
both run the benchmark.

Run by path, Python puts this folder first on sys.path, where its modules (data, settings, ...) would shadow others of
the same name and could not import each other as a package: the repository root goes there instead.
"""

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from benchmarks.knowledge_injection.pipeline import main

if __name__ == "__main__":
    main()
