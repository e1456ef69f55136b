"""Named profiles in TOML, for `dirsync run NAME` and `dirsync status [NAME]`.

The file is `--config FILE`, else `$XDG_CONFIG_HOME/dirsync/config.toml` (default
`~/.config/dirsync/config.toml`). Each profile is a `[profile.NAME]` table (singular
`profile`; no other top-level keys are allowed):

    [profile.backup]
    master   = "~/site"
    replicas = ["/mnt/backup/site", "deploy@web1:/srv/site"]
    exclude  = ["*.log", "build/"]
    delete   = true            # false: keep replica files the master lacks
    max_delete = 200           # more deletions than this: none happen (exit 25)
    backup_dir  = ".dirsync-backup"   # relative to each replica root
    backup_keep = 14           # keep the newest 14 backup run folders
    bwlimit  = "10M"           # bytes/second to each replica (K/M/G = 1024-based)
    compress = true
    jobs     = 2               # local replicas synced at once (default: one per core, at least 4)
    wait     = 300             # wait up to 300 s for a lock held by another run
    log_file = "~/.local/state/dirsync/backup.log"
    port     = 2222            # SSH options: port, identity, ssh_config, remote_cmd, rsh
    identity = "~/.ssh/backup_ed25519"  #   ("ssh": OpenSSH), accept_new_host_key, connect_timeout

    [profile.notes]            # two-way: master is side a, the one replica side b
    master   = "~/notes"
    replicas = ["/mnt/usb/notes"]
    two_way  = true
    prefer   = "newer"         # optional: settle conflicts without copies ("a", "b" or "newer")

Keys (all optional except master and replicas): see KEYS below; they are the long command
line options with `_` for `-`. Paths (master, local replicas, log_file, identity, ssh_config)
may use `~`; relative ones are relative to the directory of the config file. `backup_dir`
keeps its command-line meaning (relative = relative to each replica root).

Command-line flags given to `dirsync run` override the profile; `--exclude` patterns are
added to the profile's. Unknown keys, wrong types and bad values raise ConfigError (exit 2)
naming the file and line; so do `prefer` without `two_way = true`, and `two_way = true` with
other than exactly one replica.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from typing import Any, Callable

from dirsync.errors import ConfigError
from dirsync.record import Record

SECTION = "profile"


def default_config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "dirsync", "config.toml")


# -- value checkers: return the normalised value or raise ValueError(reason) ---------------

def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _int_min(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"expected an integer {'>= ' + str(lo) if hi is None else f'from {lo} to {hi}'}")
        return v
    return check


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError("expected a number of seconds >= 0")
    return float(v)


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError("expected a list of non-empty strings")
    return list(v)


def _replicas(v: Any) -> list[str]:
    v = _str_list(v)
    if not v:
        raise ValueError("expected at least one replica")
    return v


def _prefer(v: Any) -> str:
    if v not in ("a", "b", "newer"):
        raise ValueError('expected "a", "b" or "newer"')
    return v


def _rate(v: Any) -> int:
    from dirsync.apply import parse_rate

    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError('expected a rate like "10M" or "500K"')
    return parse_rate(str(v))


KEYS: dict[str, Callable[[Any], Any]] = {
    "master": _str,
    "replicas": _replicas,
    "exclude": _str_list,
    "delete": _bool,
    "init": _bool,
    "max_delete": _int_min(0),
    "allow_mass_delete": _bool,
    "backup_dir": _str,
    "backup_keep": _int_min(1),
    "bwlimit": _rate,
    "jobs": _int_min(1),
    "compress": _bool,
    "wait": _seconds,
    "log_file": _str,
    "quiet": _bool,
    "verbose": _bool,
    "json": _bool,
    "port": _int_min(1, 65535),
    "identity": _str,
    "ssh_config": _str,
    "remote_cmd": _str,
    "rsh": _str,
    "accept_new_host_key": _bool,
    "connect_timeout": _seconds,
    "two_way": _bool,
    "prefer": _prefer,
}
REQUIRED = ("master", "replicas")
_PATH_KEYS = ("master", "log_file", "identity", "ssh_config")


class Profile(Record):
    _fields = ("name", "path", "values")

    def __init__(
        self,
        name: str,
        path: str,  # the config file
        values: dict[str, Any] | None = None,  # checked and normalised
    ) -> None:
        self.name = name
        self.path = path
        self.values = {} if values is None else values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


class Config(Record):
    _fields = ("path", "profiles")

    def __init__(self, path: str, profiles: dict[str, Profile]) -> None:
        self.path = path
        self.profiles = profiles

    def profile(self, name: str) -> Profile:
        p = self.profiles.get(name)
        if p is None:
            have = ", ".join(sorted(self.profiles)) or "none"
            near = difflib.get_close_matches(name, list(self.profiles), n=1)
            raise ConfigError(f"{self.path}: no profile named {name!r} (profiles: {have})",
                              hint=f"did you mean {near[0]!r}?" if near else
                              f"add a [{SECTION}.{name}] table to {self.path}")
        return p


def load(path: str | None = None) -> Config:
    """Read and check the config file (`path`, else the default one). ConfigError on any problem."""
    path = os.path.abspath(os.path.expanduser(path)) if path else default_config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          hint=f"create it with a [{SECTION}.NAME] table (see `dirsync run --help`), "
                               "or pass --config FILE") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else path
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) if m else str(e)
        raise ConfigError(f"{where}: invalid TOML: {msg}") from None
    return parse(doc, path, text)


def parse(doc: dict, path: str, text: str = "") -> Config:
    for k in doc:
        if k != SECTION:
            hint = f"did you mean [{SECTION}.NAME]?" if k in ("profiles", "profile") or k in KEYS else \
                f"profiles are [{SECTION}.NAME] tables"
            raise ConfigError(f"{_where(path, text, k, ())}: unknown top-level key {k!r}", hint=hint)
    section = doc.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{_where(path, text, SECTION, ())}: {SECTION!r} must be a table of profiles")
    profiles = {}
    cfg_dir = os.path.dirname(path)
    for name, body in section.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{_where(path, text, name, (SECTION,))}: profile {name!r} must be a table "
                              f"([{SECTION}.{_toml_key(name)}])")
        values: dict[str, Any] = {}
        for k, v in body.items():
            check = KEYS.get(k)
            if check is None:
                near = difflib.get_close_matches(k, list(KEYS), n=1)
                raise ConfigError(f"{_where(path, text, k, (SECTION, name))}: profile {name!r}: unknown key {k!r}",
                                  hint=f"did you mean {near[0]!r}?" if near else
                                  "known keys: " + ", ".join(KEYS))
            try:
                values[k] = check(v)
            except ValueError as e:
                raise ConfigError(f"{_where(path, text, k, (SECTION, name))}: profile {name!r}: "
                                  f"bad value for {k!r}: {e}") from None
        for k in REQUIRED:
            if k not in values:
                raise ConfigError(f"{_where(path, text, name, (SECTION,))}: profile {name!r} has no {k!r}")
        _check_two_way(values, name, path, text)
        _resolve_paths(values, cfg_dir)
        profiles[name] = Profile(name, path, values)
    return Config(path, profiles)


def _check_two_way(values: dict[str, Any], name: str, path: str, text: str) -> None:
    """Keys that only make sense together: a two-way pair is the master and exactly one replica."""
    if "prefer" in values and not values.get("two_way"):
        raise ConfigError(f"{_where(path, text, 'prefer', (SECTION, name))}: profile {name!r}: "
                          "'prefer' only applies with two_way = true")
    n = len(values["replicas"])
    if values.get("two_way") and n != 1:
        raise ConfigError(f"{_where(path, text, 'replicas', (SECTION, name))}: profile {name!r}: "
                          f"two_way = true takes exactly one replica (the master is the other side), got {n}")


def _resolve_paths(values: dict[str, Any], base: str) -> None:
    from dirsync.transport import is_remote_spec

    def fix(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    for k in _PATH_KEYS:
        if k in values:
            values[k] = fix(values[k])
    values["replicas"] = [r if is_remote_spec(r) else fix(r) for r in values["replicas"]]


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else '"' + k.replace('"', '\\"') + '"'


_HEADER = re.compile(r"^\s*\[(?!\[)\s*(.+?)\s*\]\s*(?:#.*)?$")


def _header_path(inner: str) -> tuple[str, ...] | None:
    """Key path of a table header's inside (`profile."my site"` -> ("profile", "my site"))."""
    try:
        d = tomllib.loads(f"[{inner}]\n")
    except tomllib.TOMLDecodeError:
        return None
    out: list[str] = []
    while isinstance(d, dict) and len(d) == 1:
        k = next(iter(d))
        out.append(k)
        d = d[k]
    return tuple(out)


def _line_of(text: str, key: str, table: tuple[str, ...]) -> int | None:
    """1-based line where `key` is set inside table `table` (a best-effort scan of the text):
    first inside the right [table], then anywhere; for a table key, its [header] line."""
    lines = text.splitlines()
    key_re = re.compile(r"^\s*(?:[\w.\"' -]*\.)?\s*(?:" + re.escape(key) + r"|\"" + re.escape(key) +
                        r"\"|'" + re.escape(key) + r"')\s*=")
    current: tuple[str, ...] = ()
    anywhere = None
    for i, line in enumerate(lines, 1):
        m = _HEADER.match(line)
        if m:
            current = _header_path(m.group(1)) or ()
            if current == table + (key,) or current[:len(table) + 1] == table + (key,):
                return i
            continue
        if key_re.match(line):
            if current == table:
                return i
            if anywhere is None:
                anywhere = i
        elif anywhere is None and re.search(r"(?:^|[\s{,])(?:" + re.escape(key) + r"|\"" + re.escape(key) +
                                            r"\")\s*=", line):
            anywhere = i  # inside an inline table
    return anywhere


def _where(path: str, text: str, key: str, table: tuple[str, ...]) -> str:
    line = _line_of(text, key, table) if text else None
    return f"{path}:{line}" if line else path
