"""``python -m finetune.cli``: the ``finetune`` command."""

import sys

from finetune.cli import main

sys.exit(main())
