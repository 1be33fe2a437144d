import sys

from framelm.cli import main

sys.exit(main())
