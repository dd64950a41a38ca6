"""docs/PROTOCOL.md is generated from the DSL structs and must not drift from them."""

from __future__ import annotations

from pathlib import Path

from helperfw import protodoc
from helperfw.runtime import protocol as P

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def test_protocol_md_is_generated_from_the_structs():
    assert DOC.read_text() == protodoc.generate(), (
        "docs/PROTOCOL.md is stale: run `python -m helperfw.protodoc > docs/PROTOCOL.md`")


def test_every_layout_and_status_is_documented():
    text = DOC.read_text()
    for t in P.WIRE_STRUCTS:
        assert f"### {t.name} ({t.size} bytes" in text
        for f in t.fields.values():
            assert f"| {f.offset:#06x} | {f.type.size} | `{f.name}` |" in text
    for name, (value, _) in P.STATUS.items():
        assert f"| `{name}` | {value} |" in text


def test_mailbox_pages_hold_their_structs():
    assert P.BootInfo.size <= P.CONTROL_OFFSET
    assert P.CONTROL_OFFSET + P.Control.size <= P.PAGE_SIZE
    assert P.Command.size <= P.PAGE_SIZE
    assert P.Envelope.size == 64 and P.Envelope.offset("tag") == 0x30  # the wire format, fixed
    values = [v for v, _ in P.STATUS.values()]
    assert len(values) == len(set(values))
