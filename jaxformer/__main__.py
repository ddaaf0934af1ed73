"""``python -m jaxformer VERB ...``: the same as the ``jaxformer`` command."""

import sys

from jaxformer.commands import main

sys.exit(main())
