"""The ceiling for the API benchmark: a bare Starlette endpoint that reads and validates the
body exactly as the API does (same schema, same echo) but publishes nothing.

Run: python -m bench.bare_app PORT
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common.schema import InvalidEntries, dump_entries, parse_entries


async def message(request: Request) -> Response:
    try:
        entries = parse_entries(await request.body())
    except InvalidEntries as exc:
        return Response(str(exc), status_code=400)
    return Response(dump_entries(entries), status_code=201, media_type="application/json")


app = Starlette(routes=[Route("/message", message, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
