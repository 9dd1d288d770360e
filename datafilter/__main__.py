from datafilter.cli import main

raise SystemExit(main())
