"""master.config - main.cf and master.cf in Postfix syntax, with Postfix's parameter names.

PUBLIC API (see docs/contracts.md "master/config")
    Config.load(config_directory, overrides=None) -> Config       (maincf.py)
    ConfigError, describe(exc) -> str                             (errors.py)
    PARAMS: dict[str, Param], Param                                (params.py)
    load_master_cf(path, cfg, warn=None) -> list[Service], Service (mastercf.py)
    load_configuration(config_directory, warn=None) -> (Config, list[Service])
        everything a start or reload checks: values, modules, ports  (validate.py)
    open_relay_problem(cfg) -> str | None   Postfix's open-relay check, shared by smtpd
        and the start/reload check                                  (relayguard.py)

Nothing here logs; every problem is a ConfigError whose str is
``"<file>, line <n>: <what is wrong>"`` when it comes from a file.
"""

from typing import TYPE_CHECKING, Any

from master.config.errors import ConfigError, describe
from master.config.maincf import Config
from master.config.mastercf import BUILTIN_MODULES, Service, load_master_cf, parse_master_cf
from master.config.params import PARAMS, Param

if TYPE_CHECKING:
    from master.config.validate import load_configuration


def __getattr__(name: str) -> Any:
    """load_configuration is imported on first use: validate.py (tables, importlib,
    ipaddress, ...) costs every short-lived tool 6 ms that only start/reload need."""
    if name == "load_configuration":
        from master.config.validate import load_configuration

        return load_configuration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_MODULES",
    "PARAMS",
    "Config",
    "ConfigError",
    "Param",
    "Service",
    "describe",
    "load_configuration",
    "load_master_cf",
    "parse_master_cf",
]
