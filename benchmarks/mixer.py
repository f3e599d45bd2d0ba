from lcsm_compile.bench.mixer import main

raise SystemExit(main())
