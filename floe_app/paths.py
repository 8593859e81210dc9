"""Where Floe keeps its files: platformdirs locations, or all under $FLOE_HOME.

Private at rest: every folder Floe makes is 0700 and every file it writes 0600, whatever
the user's umask. The mechanism is the process umask (private_umask, set first thing by the
`floe` command and inherited by every process it starts: training, the sync service,
Flower's helpers), plus Paths.secure() on every start, which tightens what an older Floe or
another umask left readable by other accounts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "floe"
PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
_user_umask: int | None = None  # the umask Floe was started with (private_umask keeps it)


def private_umask() -> None:
    """From now on this process and its children create files 0600 and folders 0700."""
    global _user_umask
    previous = os.umask(PRIVATE_UMASK)
    if _user_umask is None:
        _user_umask = previous


@contextmanager
def user_umask() -> Iterator[None]:
    """The user's own umask for work that is not Floe's data (pip installing a plugin into
    a shared environment must leave it readable by the other accounts that use it)."""
    if _user_umask is None:
        yield
        return
    previous = os.umask(_user_umask)
    try:
        yield
    finally:
        os.umask(previous)


def loose_entries(root: Path) -> Iterator[tuple[Path, int]]:
    """(path, mode) of everything under root (root included) that other accounts can
    reach: group or other permission bits set. Symbolic links are neither followed nor
    listed (their own mode means nothing; their target is not Floe's)."""
    try:
        info = root.lstat()
    except OSError:
        return
    if stat.S_ISLNK(info.st_mode):
        return
    if info.st_mode & 0o077:
        yield root, stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from loose_entries(Path(entry.path))
        elif not entry.is_symlink():
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if mode & 0o077:
                yield Path(entry.path), stat.S_IMODE(mode)


def tighten(root: Path) -> tuple[int, list[str]]:
    """Make everything under root private (folders 0700, files without group/other bits).
    Returns (how many were changed, a line for each that could not be)."""
    changed, problems = 0, []
    for path, mode in list(loose_entries(root)):
        private = DIR_MODE if path.is_dir() else mode & 0o700
        try:
            path.chmod(private)
            changed += 1
        except OSError as exc:
            problems.append(f"{path}: cannot make it private ({exc.strerror})")
    return changed, problems


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def database(self) -> Path:
        return self.data_dir / "floe.db"

    @property
    def adapters_dir(self) -> Path:
        """Trained adapter versions (personalize.registry)."""
        return self.data_dir / "adapters"

    @property
    def folders(self) -> tuple[Path, Path, Path]:
        return (self.config_dir, self.data_dir, self.cache_dir)

    def ensure(self) -> Paths:
        for folder in self.folders:
            folder.mkdir(DIR_MODE, parents=True, exist_ok=True)
        return self

    def secure(self) -> list[str]:
        """ensure(), then tighten whatever other accounts could read in Floe's folders.
        Returns the lines to show: one notice if anything changed, one per failure."""
        self.ensure()
        changed, where, problems = 0, [], []
        for folder in self.folders:
            count, more = tighten(folder)
            changed += count
            where += [str(folder)] if count else []
            problems += more
        notice = ([f"made {changed} of Floe's files and folders private to this account"
                   f" (other accounts could read them) in {', '.join(where)}"]
                  if changed else [])
        return notice + problems

    def privacy_report(self) -> dict[str, object]:
        """Modes of the folders, the config and the database, and anything still loose."""
        modes = {}
        for name, path in (("config_dir", self.config_dir), ("data_dir", self.data_dir),
                           ("cache_dir", self.cache_dir), ("config", self.config_file),
                           ("database", self.database)):
            try:
                modes[name] = f"{stat.S_IMODE(path.stat().st_mode):04o}"
            except OSError:
                modes[name] = "missing"
        loose = [f"{path} {mode:04o}" for folder in self.folders
                 for path, mode in loose_entries(folder)]
        return {"modes": modes, "loose": loose, "private": not loose}


def resolve_paths(env: dict[str, str] | None = None) -> Paths:
    """FLOE_HOME (tests, profiles) moves config, data and cache under one folder."""
    env = os.environ if env is None else env
    home = env.get("FLOE_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(root / "config", root / "data", root / "cache")
    import platformdirs

    return Paths(
        Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)),
    )


def assets_dir() -> Path:
    """Styles ship inside the wheel as floe_app/assets; a source checkout keeps them at the top."""
    packaged = Path(__file__).with_name("assets")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "assets"
