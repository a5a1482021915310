"""Stage 2, analysis: hand-off of queued instances (handoff), pixel preparation in a sandboxed process
(prepare, decoding), the outbox to the broker (outbox), the node's Celery app and `node.finish` task
(celery_app, tasks, finish) and the supervised analysis services of `cxrnode serve` (pipeline)."""
