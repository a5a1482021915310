"""The `cxrnode` command line: main (serve, config, audit, ae), ops (exports, reanalyze, worker) and
triage (triage list, alerts). Commands parse arguments and print; node.admin does the work."""
