"""logfmt — Postfix's per-recipient delivery log line (log_adhoc), shared by qmgr and agents.

Summary
    Every delivery attempt is logged in Postfix's exact shape so that pflogsumm and
    people's grep habits work (postfix.md §5.3)::

        <id>: to=<rcpt>, orig_to=<orig>, relay=<relay>, delay=1.2,
            delays=0.01/0/0.5/0.6, dsn=2.0.0, status=sent (250 2.0.0 Ok)

    ``delay`` is the total time since arrival; ``delays=a/b/c/d`` split it into: a, before
    the queue manager (incl. queue time); b, in the queue manager; c, connection setup
    (DNS, HELO, TLS); d, message transmission. All in seconds.

Public API
    format_delay(seconds) -> str   Postfix's rounding: "0", "0.05", "2.3", "355".
    delivery_line(qid, rcpt, orig, relay, arrival, active, handoff, conn_done, done,
                  dsn, status, reason) -> str
"""

from __future__ import annotations

from qmgrd.spool.statuslog import quote_822_local

__all__ = ["delivery_line", "format_delay"]


def format_delay(seconds: float) -> str:
    """Format a delay (seconds) as Postfix does: 2 decimals under 1 s, 1 under 10 s."""
    if seconds < 0:
        seconds = 0.0
    if seconds >= 10:
        return str(int(seconds))
    if seconds >= 1:
        return f"{seconds:.1f}".rstrip("0").rstrip(".")
    if seconds >= 0.01:
        return f"{seconds:.2f}".rstrip("0").rstrip(".")
    return "0"


def delivery_line(
    qid: str,
    rcpt: str,
    orig: str,
    relay: str,
    arrival: float,
    active: float,
    handoff: float,
    conn_done: float,
    done: float,
    dsn: str,
    status: str,
    reason: str,
) -> str:
    """Build the log text (without the syslog prefix).

    Args:
        arrival/active/handoff/conn_done/done: epoch seconds of queue arrival, entry into
            the active queue, hand-off to the agent, connection set up, delivery done.
            A 0 (unknown) time collapses into its neighbour.
        status: sent | deferred | bounced | expired | undeliverable ...
    """
    active = active or arrival
    handoff = handoff or active
    conn_done = conn_done or handoff
    done = done or conn_done
    parts = [f"{qid}: to=<{quote_822_local(rcpt)}>"]  # the quoted form, as Postfix logs
    if orig and orig.lower() != rcpt.lower():
        parts.append(f"orig_to=<{quote_822_local(orig)}>")
    parts.append(f"relay={relay}")
    parts.append(f"delay={format_delay(done - arrival)}")
    parts.append(
        "delays="
        + "/".join(
            format_delay(x)
            for x in (active - arrival, handoff - active, conn_done - handoff, done - conn_done)
        )
    )
    parts.append(f"dsn={dsn}")
    parts.append(f"status={status} ({reason})")
    return ", ".join(parts)
