"""notify — postmaster notices of resource and software problems (``notify_classes``).

Summary
    Postfix tells the postmaster about mail that is held up by a problem of the mail
    system itself when ``notify_classes`` has the class: ``resource`` (mail not delivered
    because of a resource problem, e.g. a status log or queue file that cannot be
    written) and ``software`` (mail not delivered because of a software problem, e.g. a
    delivery agent that failed). Both go to ``error_notice_recipient`` (default
    ``postmaster``, qualified with ``@$myorigin``) from ``double-bounce@$myhostname``, as
    Postfix's daemons post them (post_mail), through cleanup.

    A delivery agent calls :func:`error_notice` once per failed request. No notice is
    sent about a message from the double-bounce address (a postmaster notice): a
    problem that also hits the notice's own delivery cannot produce notices without end.
    The notice is a short ``text/plain`` message built by hand, so that agents do not
    load the ``email`` package for it. An agent running as root (local) writes the notice
    with the effective uid and gid of the queue's owner, so that the qmgr can read it.

Public API
    error_notice(cfg, spool, klass, *, service, qid, sender, text) -> str
        the new queue id, or "" when none was sent (class not in notify_classes, a
        postmaster notice, or cleanup failed: a warning is logged). Never raises for
        queue or cleanup trouble.

Logs ``<qid>: postmaster <klass> notification: <new id>`` and warnings.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from master import log
from qmgrd.spool.cleanup import Cleanup, CleanupError
from qmgrd.spool.envelope import Envelope, Recipient
from qmgrd.spool.owner import as_owner
from qmgrd.spool.queue import Spool

if TYPE_CHECKING:
    from master.config import Config

__all__ = ["CLASSES", "error_notice"]

CLASSES = ("resource", "software")

_WHAT = {
    "resource": "a resource problem (for example a file that could not be written)",
    "software": "a software problem (a delivery agent failed)",
}


def error_notice(cfg: Config, spool: Spool, klass: str, *, service: str, qid: str,
                 sender: str, text: str) -> str:
    """Post a ``klass`` ("resource" or "software") notice about message ``qid`` (from
    ``sender``) that ``service`` could not deliver; ``text`` gives the details. Returns
    the notice's queue id, or "" when none was sent (see the module docstring)."""
    if klass not in {c.lower() for c in cfg.get_list("notify_classes")}:
        return ""
    myhostname = cfg.get("myhostname")
    double_bounce = f"{cfg.get('double_bounce_sender')}@{myhostname}"
    if sender.lower() == double_bounce.lower():
        return ""
    to = cfg.get("error_notice_recipient") or "postmaster"
    if "@" not in to:
        to = f"{to}@{cfg.get('myorigin') or myhostname}"
    body = (
        f"This is the mail system at host {myhostname}.\n\n"
        f"The {service} service could not deliver message {qid}\n"
        f"from <{sender}> because of {_WHAT.get(klass, klass)}.\n"
        f"The recipients stay in the queue and will be tried again.\n\n"
        + "".join(f"    {line}\n" for line in text.splitlines())
    )
    head = (
        f"From: MAILER-DAEMON@{myhostname} (Mail Delivery System)\n"
        f"To: {to}\n"
        f"Subject: Postmaster Warning: {service} {klass} problem with {qid}\n"
        f"Auto-Submitted: auto-generated\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset={'us-ascii' if body.isascii() else 'utf-8'}\n"
        f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}\n\n"
    )
    data = (head + body).encode("utf-8", "surrogateescape")
    env = Envelope(sender=double_bounce, recipients=[Recipient(to)])
    try:
        with as_owner(os.stat(spool.queue_path("incoming"))):
            new_id = Cleanup(cfg, spool).submit(env, data, origin="bounce")
    except (OSError, CleanupError) as exc:
        log.warning(f"{qid}: cannot post the postmaster {klass} notice: {exc}")
        return ""
    log.info(f"{qid}: postmaster {klass} notification: {new_id}")
    return new_id
