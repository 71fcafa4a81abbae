"""Sandbox.list: pagination, metadata and state filters, order (brief item 4)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState

import harness


@pytest.fixture(scope="module")
def five(conn):
    run = uuid.uuid4().hex[:12]
    made = [harness.create(conn, timeout=600, metadata={"list-run": run, "idx": str(i)}) for i in range(5)]
    yield run, made
    for s in made:
        harness.kill_quietly(s)


def _all_pages(paginator) -> list[list]:
    pages = []
    while paginator.has_next:
        pages.append(paginator.next_items())
        assert len(pages) <= 50, "paginator does not end"
    return pages


def test_pagination_with_limit(conn, five):
    run, made = five
    pages = _all_pages(Sandbox.list(query=SandboxQuery(metadata={"list-run": run}), limit=2, **conn))
    assert [len(p) for p in pages] == [2, 2, 1]
    ids = [s.sandbox_id for p in pages for s in p]
    assert sorted(ids) == sorted(s.sandbox_id for s in made)
    assert len(set(ids)) == 5
    # items carry the fields the SDK parses
    item = pages[0][0]
    assert item.state == SandboxState.RUNNING and item.template_id == "base"
    assert item.metadata["list-run"] == run and item.end_at > item.started_at


def test_pagination_limit_one_and_next_token_resume(conn, five):
    run, made = five
    p = Sandbox.list(query=SandboxQuery(metadata={"list-run": run}), limit=1, **conn)
    first = p.next_items()
    assert len(first) == 1 and p.has_next and p.next_token
    # a fresh paginator started from the token continues where the first one stopped
    rest = _all_pages(
        Sandbox.list(
            query=SandboxQuery(metadata={"list-run": run}), limit=3, next_token=p.next_token, **conn
        )
    )
    ids = [first[0].sandbox_id] + [s.sandbox_id for page in rest for s in page]
    assert sorted(ids) == sorted(s.sandbox_id for s in made)


def test_metadata_filter_matches_all_pairs(conn, five):
    run, made = five
    got = Sandbox.list(query=SandboxQuery(metadata={"list-run": run, "idx": "3"}), **conn).next_items()
    assert [s.sandbox_id for s in got] == [made[3].sandbox_id]
    none = Sandbox.list(query=SandboxQuery(metadata={"list-run": run, "idx": "9"}), **conn).next_items()
    assert none == []


def test_metadata_filter_with_a_space(new_sandbox, conn):
    """E2B's own docs filter on {"name": "My Sandbox"}. The SDK percent-encodes keys and
    values (urllib.parse.quote), then urlencodes the pairs, then httpx encodes the
    parameter: the server must unescape three times (as E2B's API does)."""
    tag = f"My Sandbox {uuid.uuid4().hex[:6]}"
    sbx = new_sandbox(timeout=120, metadata={"name": tag})
    got = Sandbox.list(query=SandboxQuery(metadata={"name": tag}), **conn).next_items()
    assert [s.sandbox_id for s in got] == [sbx.sandbox_id]


def test_metadata_filter_with_special_characters(new_sandbox, conn):
    key, value = "weird key&=", f"a b&c=d/é%+{uuid.uuid4().hex[:6]}"
    sbx = new_sandbox(timeout=120, metadata={key: value})
    got = Sandbox.list(query=SandboxQuery(metadata={key: value}), **conn).next_items()
    assert [s.sandbox_id for s in got] == [sbx.sandbox_id]


def test_state_filter(conn, five):
    run, made = five
    running = Sandbox.list(
        query=SandboxQuery(metadata={"list-run": run}, state=[SandboxState.RUNNING]), **conn
    ).next_items()
    assert len(running) == 5
    paused = Sandbox.list(
        query=SandboxQuery(metadata={"list-run": run}, state=[SandboxState.PAUSED]), **conn
    ).next_items()
    assert paused == []
    both = Sandbox.list(
        query=SandboxQuery(metadata={"list-run": run}, state=[SandboxState.RUNNING, SandboxState.PAUSED]),
        **conn,
    ).next_items()
    assert len(both) == 5


def test_order(conn, five):
    run, made = five
    q = SandboxQuery(metadata={"list-run": run})
    asc = [s for p in _all_pages(Sandbox.list(query=q, order="asc", limit=2, **conn)) for s in p]
    desc = [s for p in _all_pages(Sandbox.list(query=q, order="desc", limit=2, **conn)) for s in p]
    assert [s.started_at for s in asc] == sorted(s.started_at for s in asc)
    assert [s.started_at for s in desc] == sorted((s.started_at for s in desc), reverse=True)
    assert [s.sandbox_id for s in asc] == [s.sandbox_id for s in reversed(desc)]


def test_template_filter(conn, five):
    run, _ = five
    q = SandboxQuery(metadata={"list-run": run}, template="base")
    assert len(Sandbox.list(query=q, **conn).next_items()) == 5
    q = SandboxQuery(metadata={"list-run": run}, template="other-template")
    assert Sandbox.list(query=q, **conn).next_items() == []


def test_killed_sandboxes_leave_the_list(new_sandbox, conn):
    tag = uuid.uuid4().hex[:12]
    sbx = new_sandbox(timeout=120, metadata={"kill-tag": tag})
    q = SandboxQuery(metadata={"kill-tag": tag})
    assert [s.sandbox_id for s in Sandbox.list(query=q, **conn).next_items()] == [sbx.sandbox_id]
    assert sbx.kill() is True
    assert Sandbox.list(query=q, **conn).next_items() == []


def test_async_list(conn, five):
    run, made = five

    async def scenario():
        p = AsyncSandbox.list(query=SandboxQuery(metadata={"list-run": run}), limit=2, **conn)
        ids = []
        while p.has_next:
            ids += [s.sandbox_id for s in await p.next_items()]
        return ids

    ids = asyncio.run(scenario())
    assert sorted(ids) == sorted(s.sandbox_id for s in made)


def test_started_after_filter(new_sandbox, conn):
    from datetime import datetime, timedelta, timezone

    tag = uuid.uuid4().hex[:12]
    first = new_sandbox(timeout=120, metadata={"sa": tag})
    cut = first.get_info().started_at + timedelta(milliseconds=1)
    time.sleep(0.05)
    second = new_sandbox(timeout=120, metadata={"sa": tag})
    got = Sandbox.list(query=SandboxQuery(metadata={"sa": tag}, started_after=cut), **conn).next_items()
    assert [s.sandbox_id for s in got] == [second.sandbox_id]
    # a naive local-time datetime works too (the SDK adds the local offset)
    local_cut = (datetime.now(timezone.utc) + timedelta(hours=1)).astimezone().replace(tzinfo=None)
    later = Sandbox.list(query=SandboxQuery(metadata={"sa": tag}, started_after=local_cut), **conn).next_items()
    assert later == []


def test_exact_page_size_has_no_empty_trailing_page(conn, five):
    run, made = five
    pages = _all_pages(Sandbox.list(query=SandboxQuery(metadata={"list-run": run}), limit=5, **conn))
    assert [len(p) for p in pages] == [5]
    pages = _all_pages(Sandbox.list(query=SandboxQuery(metadata={"list-run": run}), limit=1000, **conn))
    assert [len(p) for p in pages] == [5]
