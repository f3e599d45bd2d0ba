from lcsm_compile.bench.loop import main

raise SystemExit(main())
