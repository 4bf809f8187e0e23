from pipeserve.pipeline.cli import main

raise SystemExit(main())
