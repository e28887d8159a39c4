"""Builds ``offline.html``, the page template ``dvc plots show`` / ``dvc plots diff`` fill in
(``.dvc/config``: ``plots.html_template``), with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own template loads these three scripts from a CDN, so its curves stay blank without
internet. The versions are the ones DVC's renderer asks the CDN for, so the page behaves the
same. This is a maintainer's tool (it fetches the npm tarballs, checked against the registry's
sha512); the built page is committed and nothing is fetched when plots are drawn.

    python docs/plots/build.py          # rewrites docs/plots/offline.html and LICENSES.txt
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (package, version, the file jsdelivr serves for it, npm's dist.integrity)
PACKAGES = (
    ("vega", "5.20.2", "build/vega.min.js",
     "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    ("vega-lite", "5.2.0", "build/vega-lite.min.js",
     "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    ("vega-embed", "6.18.2", "build/vega-embed.min.js",
     "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
)  # fmt: skip

# DVC fills the three placeholders; ``{scripts}`` (its CDN tags) is deliberately absent.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed (BSD-3-Clause, University of Washington Interactive Data
         Lab; docs/plots/LICENSES.txt), inlined so the page draws its plots without internet -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _member(blob: bytes, name: str) -> bytes:
    """One file of an npm tarball, read in memory by its exact name (nothing is extracted)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        member = tar.getmember(f"package/{name}")
        if not member.isfile():
            raise ValueError(f"package/{name} is not a regular file")
        return tar.extractfile(member).read()  # type: ignore[union-attr]


def fetch(package: str, version: str, integrity: str) -> bytes:
    url = f"https://registry.npmjs.org/{package}/-/{package}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (a fixed https URL)
        blob = response.read()
    algo, _, digest = integrity.partition("-")
    if base64.b64encode(hashlib.new(algo, blob).digest()).decode() != digest:
        raise ValueError(f"{url} does not match its registry integrity {integrity}")
    return blob


def build() -> None:
    scripts, licenses = [], []
    for package, version, path, integrity in PACKAGES:
        blob = fetch(package, version, integrity)
        code = _member(blob, path).decode()
        if "</script" in code.lower() or any(
            f"{{{p}}}" in code for p in ("scripts", "plot_divs", "refresh_tag")
        ):
            raise ValueError(f"{package} cannot be inlined as it is")
        scripts.append(f"    <script>/* {package}@{version} */\n{code}\n    </script>")
        licenses.append(f"{package}@{version}\n\n{_member(blob, 'LICENSE').decode().strip()}\n")
    (HERE / "offline.html").write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)))
    (HERE / "LICENSES.txt").write_text(("\n" + "-" * 72 + "\n").join(licenses))


if __name__ == "__main__":
    build()
