"""Makes the contract tests' builder (``contract_build.py``) importable."""

import pathlib
import sys

_here = str(pathlib.Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
