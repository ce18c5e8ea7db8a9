"""Checks that the GPU bundle's wheels are complete, without installing or downloading anything.

    python3 scripts/gpu/bundle_deps.py check WHEEL_DIR   # here, after build_bundle.sh downloaded them
    python3 scripts/gpu/bundle_deps.py verify WHEEL_DIR  # there, after pip install --target (PYTHONPATH set)
    VENV/bin/python scripts/gpu/bundle_deps.py image-only  # the rehearsal's stand-in holds image packages only

``check`` reads each wheel's METADATA and evaluates its Requires-Dist for CPython 3.12 on Linux x86_64
(no extras): every requirement must be met by another wheel of the bundle (at a version the specifier
admits) or by a package of the device image (scripts/gpu/image-packages.txt; versions are checked
where that file knows them). It also refuses two versions of one package, a wheel for another Python
or platform, and a wheel the image already holds. ``verify`` does the same against what Python can
import there (the bundle's --target folder plus the image), and prints the versions of the image
packages the bundle relies on, so a version the image has but the bundle cannot use shows up in the
check's first step rather than as an ImportError later.

Only the standard library and ``packaging`` (pip's copy if it is not installed) are used.
"""

from __future__ import annotations

import email.parser
import sys
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover - a bare interpreter: pip always vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

HERE = Path(__file__).resolve().parent
IMAGE_LIST = HERE / "image-packages.txt"

# the device: the image's python3 (CPython 3.12.3) on Linux x86_64
DEVICE_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",
}
# newest manylinux glibc accepted: the device's image is newer, but the rehearsal (Debian 12, glibc
# 2.36) must be able to install the very same files
MAX_GLIBC = (2, 35)


def image_packages(path: Path = IMAGE_LIST) -> dict[str, Version | None]:
    """name -> version (None where unknown) of the packages the device image holds."""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[canonicalize_name(name)] = Version(version) if version else None
    return out


def wheel_metadata(path: Path) -> tuple[str, Version, list[str]]:
    """(canonical name, version, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(meta) != 1:
            raise ValueError(f"{path.name}: expected one .dist-info/METADATA, found {len(meta)}")
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    return canonicalize_name(msg["Name"]), Version(msg["Version"]), msg.get_all("Requires-Dist") or []


def tag_problem(path: Path) -> str | None:
    """Why this wheel cannot install under CPython 3.12 manylinux x86_64 (glibc <= MAX_GLIBC), or None."""
    _, _, _, tags = parse_wheel_filename(path.name)
    for tag in tags:
        interp_ok = tag.interpreter in ("py3", "cp312") or (
            tag.abi == "abi3" and tag.interpreter in {f"cp3{m}" for m in range(2, 13)}
        )
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        plat = tag.platform
        if plat == "any":
            plat_ok = True
        elif plat.endswith("_x86_64") and plat.startswith("manylinux"):
            legacy = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12), "manylinux2014_x86_64": (2, 17)}
            if plat in legacy:
                glibc = legacy[plat]
            else:
                major, minor = plat[len("manylinux_") : -len("_x86_64")].split("_")
                glibc = (int(major), int(minor))
            plat_ok = glibc <= MAX_GLIBC
        else:
            plat_ok = False
        if interp_ok and abi_ok and plat_ok:
            return None
    return f"{path.name}: no tag for CPython 3.12 manylinux x86_64 with glibc <= {MAX_GLIBC[0]}.{MAX_GLIBC[1]}"


def applicable(requires: list[str], env: dict[str, str]) -> list[Requirement]:
    reqs = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            reqs.append(req)
    return reqs


def check(wheel_dir: Path) -> int:
    """Static completeness check of a wheel folder for the device; returns the number of problems."""
    image = image_packages()
    wheels = sorted(wheel_dir.glob("*.whl"))
    problems: list[str] = []
    if not wheels:
        print(f"no wheels in {wheel_dir}")
        return 1
    bundle: dict[str, tuple[Version, list[str]]] = {}
    for w in wheels:
        name, version, requires = wheel_metadata(w)
        if name in bundle:
            problems.append(f"two versions of {name}: {bundle[name][0]} and {version} (pip --no-index stops)")
        bundle[name] = (version, requires)
        if (p := tag_problem(w)) is not None:
            problems.append(p)
        if name in image:
            problems.append(
                f"{name} {version} is carried though the image holds {name} (carry one only for "
                f"another version, and say why in bundle.txt)"
            )
    unverified: dict[str, set[str]] = {}
    for name, (version, requires) in sorted(bundle.items()):
        for req in applicable(requires, DEVICE_ENV):
            dep = canonicalize_name(req.name)
            if dep in bundle:
                if not req.specifier.contains(bundle[dep][0], prereleases=True):
                    problems.append(f"{name} {version} needs {req}, the bundle has {dep} {bundle[dep][0]}")
            elif dep in image:
                known = image[dep]
                if known is None:
                    if str(req.specifier):
                        unverified.setdefault(dep, set()).add(f"{req.specifier} ({name})")
                elif not req.specifier.contains(known, prereleases=True):
                    problems.append(f"{name} {version} needs {req}, the image has {dep} {known}")
            else:
                problems.append(f"{name} {version} needs {req}: neither in the bundle nor in the image")
    print(f"{len(bundle)} wheels; requirements evaluated for CPython 3.12 on Linux x86_64")
    for dep, specs in sorted(unverified.items()):
        print(f"  image package, version unknown here: {dep} {'; '.join(sorted(specs))}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("bundle complete" if not problems else f"{len(problems)} problem(s)")
    return len(problems)


def verify(wheel_dir: Path) -> int:
    """On the target: every requirement of every bundled wheel is importable at an admitted version."""
    from importlib import metadata

    env = {**default_environment(), "extra": ""}
    problems, relied = [], {}
    bundled = set()
    for w in sorted(wheel_dir.glob("*.whl")):
        name, version, requires = wheel_metadata(w)
        bundled.add(name)
        try:
            found = Version(metadata.version(name))
            if found != version:
                problems.append(f"{name}: the bundle holds {version}, Python imports {found}")
        except metadata.PackageNotFoundError:
            problems.append(f"{name} {version}: not installed (is PYTHONPATH set to the --target folder?)")
        for req in applicable(requires, env):
            dep = canonicalize_name(req.name)
            try:
                have = Version(metadata.version(dep))
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            relied.setdefault(dep, have)
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, found {dep} {have}")
    print(
        "image packages the bundle relies on: "
        + ", ".join(f"{d} {v}" for d, v in sorted(relied.items()) if d not in bundled)
    )
    for p in problems:
        print(f"PROBLEM: {p}")
    print("bundle requirements met" if not problems else f"{len(problems)} unmet requirement(s)")
    return len(problems)


def image_only() -> int:
    """The running Python holds only packages of the device image (and pip), and no mlflow or optuna:
    so a rehearsal that passes in it cannot lean on anything the device lacks."""
    from importlib import metadata

    image = image_packages()
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    extra = sorted(f"{n} {v}" for n, v in found.items() if n not in image and n != "pip")
    print(f"{len(found)} distributions importable by {sys.executable}")
    for e in extra:
        print(f"PROBLEM: {e} is not in the device image (scripts/gpu/image-packages.txt)")
    return len(extra)


def main(argv: list[str]) -> int:
    if argv == ["image-only"]:
        return 1 if image_only() else 0
    if len(argv) != 2 or argv[0] not in ("check", "verify"):
        print(__doc__)
        return 2
    return 1 if (check if argv[0] == "check" else verify)(Path(argv[1])) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
