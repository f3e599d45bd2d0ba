from lcsm_compile.bench.generate import main

raise SystemExit(main())
