"""Safe discovery: a fleche.toml that someone else could have written is
skipped with a warning (git's safe.directory idea), and the walk stops at
$HOME when the working directory is inside it.

The tests run as root, so "someone else" is made with ``os.chown`` to an
unused uid; one test runs discovery in a child process as an unprivileged
uid, to prove that root-owned files stay trusted for ordinary users.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from fleche_remote import ConfigError
from fleche_remote.config import forget_loaded_caches, load_cache, load_config
from fleche_remote.config.trust import UntrustedConfigWarning

REPO = Path(__file__).resolve().parents[1]
#: uids no account uses (a file owned by them is "someone else's")
ALICE, MALLORY = 54321, 54322
PLANTED = '[default]\ncache = "planted"\n\n[planted]\ntype = "ssh"\nhost = "evil"\nssh = "/tmp/evil.sh"\n'


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path/shared/project`` (the working directory, outside $HOME),
    with the project's own fleche.toml; $HOME is elsewhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    project = tmp_path / "shared" / "project"
    project.mkdir(parents=True)
    (project / "fleche.toml").write_text('[mine]\ntemplate = "memory"\n')
    monkeypatch.chdir(project)
    forget_loaded_caches()
    yield project
    forget_loaded_caches()


def plant(path: Path, mode: int, uid: int = 0) -> Path:
    path.write_text(PLANTED)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def assert_ignored(project: Path, planted: Path, reason: str) -> None:
    with pytest.warns(UntrustedConfigWarning, match=re.escape(f"ignoring {planted}: ")) as record:
        config = load_config()
    assert config.files == [project / "fleche.toml"]
    assert "planted" not in config and "default" not in config
    assert [p for p, _ in config.ignored] == [planted]
    assert reason in config.ignored[0][1]
    message = str(record[0].message)
    assert f"chmod go-w {planted}" in message and reason in message
    # the planted default is not used: the project's file has none
    with pytest.raises(ConfigError, match="no default set"), pytest.warns(UntrustedConfigWarning):
        load_cache()


def test_a_world_writable_file_above_the_project_is_ignored(layout: Path) -> None:
    planted = plant(layout.parent / "fleche.toml", 0o666)
    assert_ignored(layout, planted, "writable by group and others (mode 666)")


def test_a_group_writable_file_is_ignored(layout: Path) -> None:
    planted = plant(layout.parent / "fleche.toml", 0o664)
    assert_ignored(layout, planted, "writable by group (mode 664)")


def test_a_file_owned_by_another_user_in_a_sticky_world_writable_dir_is_ignored(layout: Path) -> None:
    """Like ``/tmp/fleche.toml`` written by someone else: mode 644, other owner."""
    os.chmod(layout.parent, 0o1777)
    planted = plant(layout.parent / "fleche.toml", 0o644, uid=MALLORY)
    assert_ignored(layout, planted, f"owned by uid {MALLORY}")


def test_own_and_root_owned_files_are_trusted(layout: Path) -> None:
    above = layout.parent / "fleche.toml"
    above.write_text('[above]\ntemplate = "memory"\n')
    os.chmod(above, 0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config()
    assert config.files == [layout / "fleche.toml", above] and config.ignored == []


def test_the_xdg_file_is_checked_too(layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "fleche").mkdir(parents=True)
    planted = plant(xdg / "fleche" / "cache.toml", 0o646)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert_ignored(layout, planted, "writable by others (mode 646)")


def test_the_walk_stops_at_home_so_a_file_above_it_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    planted = plant(tmp_path / "fleche.toml", 0o666)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even looked at, so no warning
        config = load_config(cwd=home / "project")
    assert planted not in config.searched and config.files == [] and config.ignored == []


def test_root_true_in_the_project_stops_before_the_planted_file(layout: Path) -> None:
    (layout / "fleche.toml").write_text(
        '[default]\nroot = true\ncache = "mine"\n[mine]\ntemplate = "memory"\n'
    )
    plant(layout.parent / "fleche.toml", 0o666)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config().files == [layout / "fleche.toml"]


def test_a_file_named_explicitly_is_read_as_it_is(layout: Path) -> None:
    planted = plant(layout.parent / "fleche.toml", 0o666)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(planted)
    assert config.files == [planted] and "planted" in config


def test_cli_config_lists_the_ignored_file(layout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleche_remote.cli import main

    planted = plant(layout.parent / "fleche.toml", 0o666)
    with pytest.warns(UntrustedConfigWarning):
        assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert f"# ignored {planted}: it is writable by group and others" in out
    assert "[mine]" in out and "planted" not in out.replace(str(planted), "")


def _interpreter_for(uid: int) -> str:
    """A Python 3.9+ that an unprivileged uid may run (the test venv's may
    live under /root, which it cannot enter)."""
    probe = "import sys; assert sys.version_info >= (3, 9)"
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        try:
            done = subprocess.run(
                [candidate, "-c", probe], user=uid, group=uid, extra_groups=[], capture_output=True
            )
        except OSError:  # missing, or not executable by uid
            continue
        if done.returncode == 0:
            return candidate
    raise AssertionError("no Python 3.9+ on this machine that an unprivileged user can run")


def test_as_an_ordinary_user_root_owned_files_are_trusted_and_others_are_not() -> None:
    """A real unprivileged process (uid ALICE): its own file and a root-owned
    one are read, Mallory's file between them is skipped."""
    if os.geteuid() != 0:  # the suite runs as root; as anyone else this is the in-process tests above
        pytest.fail("this test needs root to start a process as another uid")
    base = Path(tempfile.mkdtemp(prefix="fleche-discovery-"))  # /tmp: not inside pytest's 0700 tree
    try:
        os.chmod(base, 0o755)
        (base / "fleche.toml").write_text('[from_root]\ntemplate = "memory"\n')  # root-owned, 0644
        os.chmod(base / "fleche.toml", 0o644)
        mallory = base / "team"
        mallory.mkdir(mode=0o755)
        plant(mallory / "fleche.toml", 0o644, uid=MALLORY)
        project = mallory / "alice"
        home = base / "home"
        for d in (project, home):
            d.mkdir(mode=0o755)
            os.chown(d, ALICE, ALICE)
        (project / "fleche.toml").write_text('[from_alice]\ntemplate = "memory"\n')
        os.chown(project / "fleche.toml", ALICE, ALICE)
        code = textwrap.dedent(
            """
            import json, os, warnings
            from fleche_remote.config import load_config
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = load_config()
            print(json.dumps({
                "uid": os.geteuid(),
                "files": [str(f) for f in config.files],
                "ignored": [str(p) for p, _ in config.ignored],
                "tables": sorted(config),
                "warnings": [str(w.message) for w in caught],
            }))
            """
        )
        env = {
            "HOME": str(home),
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": "/usr/bin:/bin",
        }
        done = subprocess.run(
            [_interpreter_for(ALICE), "-c", code],
            user=ALICE,
            group=ALICE,
            extra_groups=[],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert seen["uid"] == ALICE
        assert seen["files"][:2] == [str(project / "fleche.toml"), str(base / "fleche.toml")]
        assert str(mallory / "fleche.toml") in seen["ignored"]
        assert {"from_alice", "from_root"} <= set(seen["tables"]) and "planted" not in seen["tables"]
        assert any(f"owned by uid {MALLORY}, not by you (uid {ALICE})" in w for w in seen["warnings"])
    finally:
        shutil.rmtree(base)
