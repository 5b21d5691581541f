from ssd300.cli import main

raise SystemExit(main())
