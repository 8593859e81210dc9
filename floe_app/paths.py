"""Where Floe keeps its files: platformdirs locations, or all under $FLOE_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "floe"


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

    def ensure(self) -> Paths:
        for folder in (self.config_dir, self.data_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


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
