"""The shared helpers' old single-file home, kept only as a pointer: everything moved into the `common`
package next to it (see common/__init__.py), which the scripts import. tests/test_sft_packing.py and
tests/test_shared_prefix.py load this file by path for the real-shaped data generators; once they load
common/data.py instead, this file can go."""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path: make `common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import *  # noqa: E402,F401,F403
from common import __all__  # noqa: E402,F401
