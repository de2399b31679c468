from effx.cli import main

raise SystemExit(main())
