"""The program routes of agentserve's front ends (`POST /v1/programs/{id}/tool`, `POST
/v1/programs/{id}/end`, `GET /v1/programs/{id}`, `GET /v1/agentserve/stats`), the wire contract in the
OpenAPI spec, and the embedded server's control tick.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request

from agentserve.programs.control import Control, ControlPlane
from agentserve.programs.fields import ProgramFields, ToolEvent
from agentserve.programs.tracker import ProgramError
from agentserve.server import metrics
from agentserve.server.middleware import error_response
from agentserve.server.periodic import every

TICK_S = 0.2  # pin expiry resolution while the engine is idle; an engine step also expires pins


def document_wire_contract(app: FastAPI) -> None:
    """Put the `agentserve` request object (and the tool event body) into the app's OpenAPI spec: the
    middleware takes the object out before vLLM's pydantic models see the body, so FastAPI cannot
    infer it."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = original()
        (fields, _), defs = msgspec.json.schema_components(
            [ProgramFields, ToolEvent], ref_template="#/components/schemas/{name}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        defs["ProgramFields"]["properties"].pop("inferred", None)  # the server's mark, refused from clients
        schemas.update(defs)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            if name in schemas:
                schemas[name].setdefault("properties", {})["agentserve"] = {
                    **fields, "description": "agentserve program fields (README: the wire contract); "
                                             "requests without them are served as stock vLLM serves them"}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi


def add_program_routes(app: FastAPI, control: Control, *, record_metrics: bool = True) -> None:
    """The program routes, answered by `control` (the server's own, or on Ray Serve the shared one).
    `record_metrics`: the stats route refreshes this process's engine metrics (on Ray Serve the
    control plane's tick does, in its own process)."""
    document_wire_contract(app)

    async def call(answer: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await answer(), None
        except ProgramError as e:
            return None, error_response(e.status, str(e), "program_id")

    @app.post("/v1/programs/{program_id:path}/tool", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ToolEvent"}}}}})
    async def tool_event(program_id: str, request: Request):
        try:
            event = msgspec.json.decode(await request.body(), type=ToolEvent)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return error_response(400, f"invalid tool event: {e}", "body")
        duration, error = await call(lambda: control.tool_event(program_id, event.name, event.event,
                                                                event.duration_s))
        return error or {"program_id": program_id, "tool": event.name, "event": event.event,
                         "duration_s": duration}

    @app.post("/v1/programs/{program_id:path}/end")
    async def end_program(program_id: str):
        _, error = await call(lambda: control.end_program(program_id))
        return error or {"program_id": program_id, "ended": True}

    @app.get("/v1/programs/{program_id:path}")
    async def get_program(program_id: str):
        described, error = await call(lambda: control.describe(program_id))
        return error or described

    @app.get("/v1/agentserve/stats")
    async def stats():
        result = await control.stats()
        if record_metrics:
            metrics.record_engine_stats(result["engine"])
        return {**result, "hints": metrics.hint_counts()}  # judged where requests enter: this process


async def tick_loop(control: ControlPlane) -> None:
    """Periodic: end abandoned programs, expire pins while the engine is idle, refresh the metrics."""
    async def tick() -> None:
        metrics.record_engine_stats(await control.tick())
        metrics.PROGRAMS_LIVE.set(control.live_programs())
        metrics.record_ttl_inputs(control.ttl_inputs())

    await every(TICK_S, tick, "agentserve tick")
