"""``python -m testdata build|path|list``: see the package docstring."""

import sys

from testdata import main

sys.exit(main())
