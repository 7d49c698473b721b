from ztunnel_py.cli import main

raise SystemExit(main())
