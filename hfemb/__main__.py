import sys

from hfemb.cli import main

sys.exit(main())
