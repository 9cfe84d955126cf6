from mpillama.cli import main

raise SystemExit(main())
