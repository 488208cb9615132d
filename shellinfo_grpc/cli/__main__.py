"""``python -m shellinfo_grpc.cli``: the ``shellinfo`` command line."""

import sys

from shellinfo_grpc.cli import main

sys.exit(main())
