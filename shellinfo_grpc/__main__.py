"""``python -m shellinfo_grpc --show-source``: print the generated REST codec.

``from_rest`` and ``to_rest`` are generated at import from the schema's field
table (see :mod:`shellinfo_grpc.rest`); this prints the code that runs, so a
reader can see it and step through it. (``python -m shellinfo_grpc.rest``
does the same, but Python warns there, since the package imports the codec
before running the module as ``__main__``.)
"""

from __future__ import annotations

import sys

from shellinfo_grpc.rest import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m shellinfo_grpc"))
