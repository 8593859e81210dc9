from floe_app.cli import main

raise SystemExit(main())
