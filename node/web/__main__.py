from node.web.server import main

raise SystemExit(main())
