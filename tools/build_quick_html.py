"""Render the quick-executed chapters to HTML with execution off and every warning an error.

Output: _build/quick/book/_build/html
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from book import prepare_quick_book  # noqa: E402

src = prepare_quick_book()
cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--builder", "html",
       "-W", "-n", "--keep-going"]  # fmt: skip
sys.exit(subprocess.call(cmd))
