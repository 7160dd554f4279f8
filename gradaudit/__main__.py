from gradaudit.cli.main import main

raise SystemExit(main())
