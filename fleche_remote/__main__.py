"""``python -m fleche_remote``: the ``fleche-remote`` command.

This is also how an ``SshCache`` starts its server on the far side
(``python -m fleche_remote serve``), so it must work with nothing but the
package importable: no console script on PATH is needed.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
