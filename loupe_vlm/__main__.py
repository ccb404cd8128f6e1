"""``python -m loupe_vlm VERB ...``: the ``loupe`` command (also under ``accelerate launch -m loupe_vlm``)."""

import sys

from loupe_vlm.cli import main

sys.exit(main())
