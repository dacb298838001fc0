"""What every sessionmesh server carries besides its own service: health and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class StandardServices:
    """The standard health service and server reflection for a server of ``service``."""

    def __init__(self, server: grpc.aio.Server, service: str) -> None:
        self.service = service
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def serving(self) -> None:
        for name in ("", self.service):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()
