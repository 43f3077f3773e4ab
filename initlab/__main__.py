from initlab.cli import main

raise SystemExit(main())
