import sys

from pdserve_cli.main import main

sys.exit(main())
