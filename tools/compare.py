"""Compare qlit runs side by side: print one Markdown row per run, read from its TensorBoard logs.

    python tools/compare.py logs/ [--sort val/loss [--descending]] [--csv study.csv] [--plots study_plots/]

The work is :func:`qlit.compare.main` (also ``qlit compare``); this script only hands it the arguments.
"""

from __future__ import annotations

import sys

from qlit.compare import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="tools/compare.py")
