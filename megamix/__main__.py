from megamix.cli import main

raise SystemExit(main())
