"""``python -m bench``: list the benchmarks."""

from __future__ import annotations

import pkgutil
from pathlib import Path

if __name__ == "__main__":
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]))
    print("benchmarks (run as python -m bench.<name>):")
    for name in names:
        if not name.startswith("_"):
            print(f"  {name}")
