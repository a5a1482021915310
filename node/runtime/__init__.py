"""The running node: configuration (config), start-time checks (preflight), logging, the serve process
and its children (serve, listeners, supervisor), periodic loops (loop), retention, health and metrics."""
