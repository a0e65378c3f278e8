"""Logging setup of every wideep process: one format, one level rule.

The level is the command's --log-level when it has one, else $WIDEEP_LOG_LEVEL, else INFO; child
processes inherit the environment, so a level set once reaches the whole tree. At INFO the HTTP
tiers (server frontend, router proxy, sidecar) log one access line per request.
"""
from __future__ import annotations

import logging

from wideep import envs

FORMAT = "%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s"


def setup_logging(role: str, level: str | None = None) -> None:
    """Configure the root logger of this process; `role` names the process kind in every line."""
    logging.basicConfig(level=(level or envs.WIDEEP_LOG_LEVEL).upper(), format=FORMAT.format(role=role), force=True)


# access log of the HTTP tiers (wideep.utils.aio.access_logger_class): client, request line, status,
# body bytes, seconds; probes and metric scrapes are left out
ACCESS_LOG = logging.getLogger("wideep.access")
