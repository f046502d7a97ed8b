"""The wheel installs exactly one top-level name, ``autotls``, and carries its Alembic scripts.

An embedder with its own ``migrations`` (Alembic, Flask-Migrate), ``fsm`` or ``persistence``
package on ``sys.path`` must never have ours shadow theirs, nor theirs run against our
database. Checked on the built wheel, not the editable install.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("autotls-*.whl")
    return built


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"autotls"}, f"the wheel exposes generic top-level names: {sorted(top)}"
    for needed in (
        "autotls/fsm/machine.py",
        "autotls/persistence/store.py",
        "autotls/migrations/env.py",
        "autotls/migrations/script.py.mako",
        "autotls/migrations/versions/0001_initial.py",
    ):
        assert needed in names, f"{needed} missing from the wheel"


def test_installed_wheel_ignores_an_embedders_migrations_package(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
        capture_output=True,
    )
    app = tmp_path / "app"
    (app / "migrations").mkdir(parents=True)
    (app / "migrations" / "__init__.py").write_text("raise RuntimeError('the embedder')\n")
    db = tmp_path / "x.db"
    probe = (
        "import autotls, autotls.persistence.schema as s\n"
        "from sqlalchemy.engine import make_url\n"
        f"assert autotls.__file__.startswith({str(target)!r}), autotls.__file__\n"
        f"assert str(s.MIGRATIONS_DIR).startswith({str(target)!r}), s.MIGRATIONS_DIR\n"
        f"s.upgrade(make_url('sqlite:///{db}'))\n"
        "print(s.head_revision())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=app,
        env={"PYTHONPATH": f"{app}:{target}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
