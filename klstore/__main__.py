from klstore.cli import main

raise SystemExit(main())
