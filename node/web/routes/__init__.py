"""The console's routes, one APIRouter per area; node.web.app includes them all."""

from node.web.routes import ae, auth, ops, records, studies, triage

ROUTERS = (ops.router, auth.router, studies.router, ae.router, records.router, triage.router)
