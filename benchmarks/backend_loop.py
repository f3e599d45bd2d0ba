from lcsm_compile.tools.bench.loop import main

raise SystemExit(main())
