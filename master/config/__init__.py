"""master.config - main.cf and master.cf in Postfix syntax, with Postfix's parameter names.

PUBLIC API (see docs/contracts.md "master/config")
    Config.load(config_directory, overrides=None) -> Config       (maincf.py)
    ConfigError                                                    (errors.py)
    PARAMS: dict[str, Param], Param                                (params.py)
    load_master_cf(path, cfg) -> list[Service], Service            (mastercf.py)

Nothing here logs; every problem is a ConfigError whose str is
``"<file>, line <n>: <what is wrong>"`` when it comes from a file.
"""

from master.config.errors import ConfigError
from master.config.maincf import Config
from master.config.mastercf import BUILTIN_MODULES, Service, load_master_cf, parse_master_cf
from master.config.params import PARAMS, Param

__all__ = [
    "BUILTIN_MODULES",
    "PARAMS",
    "Config",
    "ConfigError",
    "Param",
    "Service",
    "load_master_cf",
    "parse_master_cf",
]
