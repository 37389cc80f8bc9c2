"""master.config - main.cf and master.cf in Postfix syntax, with Postfix's parameter names.

PUBLIC API (see docs/contracts.md "master/config")
    Config.load(config_directory, overrides=None) -> Config       (maincf.py)
    ConfigError, describe(exc) -> str                             (errors.py)
    PARAMS: dict[str, Param], Param                                (params.py)
    load_master_cf(path, cfg, warn=None) -> list[Service], Service (mastercf.py)
    load_configuration(config_directory, warn=None) -> (Config, list[Service])
        everything a start or reload checks: values, modules, ports  (validate.py)

Nothing here logs; every problem is a ConfigError whose str is
``"<file>, line <n>: <what is wrong>"`` when it comes from a file.
"""

from master.config.errors import ConfigError, describe
from master.config.maincf import Config
from master.config.mastercf import BUILTIN_MODULES, Service, load_master_cf, parse_master_cf
from master.config.params import PARAMS, Param
from master.config.validate import load_configuration

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
