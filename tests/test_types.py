"""Parameters and results richer than JSON, through pydantic: dataclasses, enums, dates,
UUIDs, models, constraints; plain JSON tools keep their own fast path."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import uuid
from typing import Annotated, Any

import pydantic
import pytest
from typing_extensions import TypedDict  # pydantic's kind, on Python 3.11 too

from sessionmesh import mesh
from sessionmesh.errors import InvalidArguments
from sessionmesh.testing import running_agent

pytestmark = pytest.mark.anyio


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"


@dataclasses.dataclass
class Item:
    name: str
    size: Size
    count: int = 1


class Order(pydantic.BaseModel):
    id: uuid.UUID
    items: list[Item]
    due: datetime.date


@mesh.tool
def order(
    items: list[Item],
    due: datetime.date,
    quantity: Annotated[int, pydantic.Field(gt=0, le=100)] = 1,
) -> Order:
    """Returns a model: it travels as JSON (the date as ISO text)."""
    return Order(id=uuid.UUID(int=7), items=items * quantity, due=due)


@mesh.tool
def sizes(size: Size, at: datetime.datetime) -> dict[str, Any]:
    return {"size": size.value, "hour": at.hour}


@mesh.tool
def half(n: int) -> list[float]:
    return [n / 2, float(n)]


class Reading(TypedDict):
    zeta: int
    alpha: float
    mid: str


@mesh.tool
def reading() -> Reading:
    return {"zeta": 1, "alpha": 2.0, "mid": "m"}


async def test_rich_arguments_are_validated_and_results_serialized() -> None:
    async with running_agent(order, sizes) as (_, client):
        got = await client.proxy("order")(
            items=[{"name": "book", "size": "small"}], due="2026-12-01", quantity=2
        )
        assert got == {
            "id": "00000000-0000-0000-0000-000000000007",
            "items": [{"name": "book", "size": "small", "count": 1}] * 2,
            "due": "2026-12-01",
        }
        assert await client.proxy("sizes")(size="large", at="2026-11-28T13:05:00") == {
            "size": "large",
            "hour": 13,
        }


async def test_every_bad_argument_is_named_at_once() -> None:
    async with running_agent(order) as (_, client):
        with pytest.raises(InvalidArguments) as info:
            await client.proxy("order")(
                items=[{"name": "book", "size": "medium"}], due="someday", quantity=0
            )
        message = info.value.message
        assert info.value.field == "items.0.size"
        assert "'items.0.size'" in message and "'small' or 'large'" in message
        assert "'due'" in message and "'quantity'" in message and "greater than 0" in message


async def test_list_tools_shows_the_rich_schemas() -> None:
    async with running_agent(order) as (_, client):
        [tool] = await client.list_tools()
        params = tool["parameters"]
        assert params["properties"]["due"] == {"format": "date", "type": "string"}
        assert params["properties"]["quantity"]["exclusiveMinimum"] == 0
        assert params["$defs"]["Size"]["enum"] == ["small", "large"]
        assert tool["output"]["properties"]["id"]["format"] == "uuid"


async def test_a_proxy_made_from_the_tool_function_returns_its_type() -> None:
    async with running_agent(order, sizes, half) as (_, client):
        placed = await client.proxy(order)(
            items=[{"name": "pen", "size": "large"}], due="2027-01-02"
        )
        assert isinstance(placed, Order)
        assert placed.items == [Item("pen", Size.LARGE)] and placed.due == datetime.date(2027, 1, 2)
        plain = await client.proxy(sizes)(size="small", at="2026-11-28T09:00:00")
        assert plain == {"size": "small", "hour": 9}  # JSON already: as it came
        halves = await client.proxy(half)(n=4)
        assert halves == [2.0, 4.0] and all(type(h) is float for h in halves)  # not 2, 4


async def test_a_typed_proxy_gives_objects_back_in_their_declared_key_order() -> None:
    # The wire's objects are JSON objects (a protobuf Struct: a map), and maps do not keep
    # the order of their keys. A typed proxy rebuilds the declared type, in its order.
    async with running_agent(reading) as (_, client):
        untyped = await client.proxy("reading")()
        assert untyped == {"zeta": 1, "alpha": 2, "mid": "m"}  # equal, in some order
        typed = await client.proxy(reading)()
        assert list(typed) == ["zeta", "alpha", "mid"]
        assert type(typed["alpha"]) is float


class Opaque:
    """A class pydantic has no schema for."""


def test_an_annotation_the_agent_cannot_validate_is_named_when_it_loads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @mesh.tool
    def keep(thing: Opaque, count: int = 1) -> Opaque:
        return thing

    with caplog.at_level(logging.WARNING, logger="sessionmesh.agent"):
        mesh.Agent([keep])
    said = [r.getMessage() for r in caplog.records]
    assert any("tool 'keep': parameter 'thing'" in m and "unchecked" in m for m in said), said
    assert any("tool 'keep': its result" in m for m in said), said
    assert not any("'count'" in m for m in said)


async def test_rich_values_are_sent_as_the_types_the_tool_declares() -> None:
    # It used to fail on the caller's side: "argument items is a Item, which has no JSON form".
    async with running_agent(order, sizes) as (_, client):
        due = datetime.date(2026, 12, 7)
        async with client.proxy(order) as typed:
            made = await typed(items=[Item("pen", Size.SMALL, 2)], due=due)
            assert made == Order(id=uuid.UUID(int=7), items=[Item("pen", Size.SMALL, 2)], due=due)
            again = await typed.options(timeout=5)(items=[Item("cap", Size.LARGE)], due=due)
            assert isinstance(again, Order) and again.items[0].size is Size.LARGE
        at = datetime.datetime(2026, 12, 7, 9, 30)
        assert await client.proxy("sizes")(size=Size.LARGE, at=at) == {"size": "large", "hour": 9}
