"""/healthz, /readyz and /metrics: no login (scraped by Prometheus and probed by orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from node.runtime import metrics
from node.runtime.health import readiness
from node.web.console import ConsoleDep, logged_in

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, console: ConsoleDep) -> JSONResponse:
    """Status code and which checks pass for anyone (probes); what each found (versions, URLs, free
    space) only for a logged-in console user."""
    result = readiness(console.settings, console.store.engine, workers_probe=console.workers_probe)
    body = result.as_dict()
    if not logged_in(request):
        body["checks"] = {
            name: {k: v for k, v in check.items() if k not in ("detail", "data")}
            for name, check in body["checks"].items()
        }
    return JSONResponse(body, status_code=200 if result.ready else 503)


@router.get("/metrics")
def metrics_endpoint() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
